"""Stage 3, the plan: memory model, exact placement strategies, explicit maps, budgets, fit advice,
saved plans. Pure functions of config, anatomy and devices: no weights, no CUDA."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.planning.deployment_plan import (
        DeploymentDoesNotFit,
        PlannedDeployment,
        plan_deployment,
    )
    from glmdeploy.planning.memory import memory_model
    from glmdeploy.planning.strategies import plan_placement, try_plan
    from glmdeploy.planning.types import DeviceSpec, Plan, PlanDoesNotFit

__all__ = [
    "DeploymentDoesNotFit",
    "DeviceSpec",
    "Plan",
    "PlanDoesNotFit",
    "PlannedDeployment",
    "memory_model",
    "plan_deployment",
    "plan_placement",
    "try_plan",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "DeploymentDoesNotFit": "deployment_plan",
        "DeviceSpec": "types",
        "Plan": "types",
        "PlanDoesNotFit": "types",
        "PlannedDeployment": "deployment_plan",
        "memory_model": "memory",
        "plan_deployment": "deployment_plan",
        "plan_placement": "strategies",
        "try_plan": "strategies",
    },
)
