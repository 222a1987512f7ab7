"""`python -m glmdeploy` is the `glmdeploy` command."""

from glmdeploy.cli.main import console

console()
