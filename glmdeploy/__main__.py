"""`python -m glmdeploy` is the `glmdeploy` command."""

import sys

from glmdeploy.cli.main import main

sys.exit(main())
