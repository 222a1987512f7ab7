"""Stage 2, the model: its transformers config and its skeleton (anatomy) on the meta device;
legacy ChatGLM names and config mapping."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.model.anatomy import Anatomy, Unit
    from glmdeploy.model.hf_config import config_from_architecture, hf_config_for
    from glmdeploy.model.skeleton import build_anatomy

__all__ = [
    "Anatomy",
    "Unit",
    "build_anatomy",
    "config_from_architecture",
    "hf_config_for",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Anatomy": "anatomy",
        "Unit": "anatomy",
        "build_anatomy": "skeleton",
        "config_from_architecture": "hf_config",
        "hf_config_for": "hf_config",
    },
)
