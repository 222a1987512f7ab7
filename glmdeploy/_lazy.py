"""Lazy re-exports for package `__init__` modules (PEP 562), so importing a package is cheap.

`import glmdeploy` must not import torch; a package's public names are imported from the module
that defines them on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package` exporting each name from `exports[name]`.

    Args:
        package: the package's `__name__`.
        exports: public name -> the module (absolute, or relative to `package`) that defines it.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target = module if module.startswith("glmdeploy") else f"{package}.{module}"
        return getattr(importlib.import_module(target), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
