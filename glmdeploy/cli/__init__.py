"""The `glmdeploy` command line."""

from glmdeploy.cli.main import main

__all__ = ["main"]
