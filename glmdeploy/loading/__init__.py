"""Stage 4, the load: checkpoints, legacy conversion, embedded models, the loader and its
placement verification. The only stage that reads weights and touches CUDA."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.loading.convert import convert_checkpoint, ensure_native
    from glmdeploy.loading.embedded import materialize
    from glmdeploy.loading.loader import LoadedModel, load_model
    from glmdeploy.loading.verify import verify_placement

__all__ = [
    "LoadedModel",
    "convert_checkpoint",
    "ensure_native",
    "load_model",
    "materialize",
    "verify_placement",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "LoadedModel": "loader",
        "convert_checkpoint": "convert",
        "ensure_native": "convert",
        "load_model": "loader",
        "materialize": "embedded",
        "verify_placement": "verify",
    },
)
