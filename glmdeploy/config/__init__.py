"""Stage 1, the config: compose YAML groups and overrides, validate them, and type the result."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.config.compose import compose_dict
    from glmdeploy.config.deployments import load_deployment, load_deployments
    from glmdeploy.config.locations import ConfigSource, config_source
    from glmdeploy.config.settings import Deployment
    from glmdeploy.config.sweep import expand_sweep
    from glmdeploy.config.validate import validate_dict

__all__ = [
    "ConfigSource",
    "Deployment",
    "compose_dict",
    "config_source",
    "expand_sweep",
    "load_deployment",
    "load_deployments",
    "validate_dict",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ConfigSource": "locations",
        "Deployment": "settings",
        "compose_dict": "compose",
        "config_source": "locations",
        "expand_sweep": "sweep",
        "load_deployment": "deployments",
        "load_deployments": "deployments",
        "validate_dict": "validate",
    },
)
