"""Where glmdeploy keeps what it computes once and reuses: `$GLMDEPLOY_CACHE` or ~/.cache/glmdeploy.

A neutral module (no stage imports it for anything else), so that planning can find the anatomy
cache without importing the loading stage. Subdirectories: `embedded/` (materialised embedded
models), `converted/` (converted legacy checkpoints), `anatomy/` (model skeletons as JSON).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "GLMDEPLOY_CACHE"  # replaces ~/.cache/glmdeploy


def cache_root() -> Path:
    """glmdeploy's cache directory: `$GLMDEPLOY_CACHE`, else `~/.cache/glmdeploy`."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "glmdeploy"
