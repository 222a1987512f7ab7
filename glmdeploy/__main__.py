"""`python -m glmdeploy` is the `glmdeploy` command."""

import sys

from glmdeploy.cli import main

sys.exit(main())
