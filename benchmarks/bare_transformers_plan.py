"""The baseline that `glmdeploy plan` is timed against: transformers alone places the same model.

It does what a user would write without glmdeploy: build the transformers config, build the model
on the meta device (no weights), and ask transformers' own `infer_auto_device_map` for a device map
under the same per-GPU budgets; then print the map. `benchmarks/cli_latency.py` times it as a
subprocess, like the CLI.

    python benchmarks/bare_transformers_plan.py [--glmdeploy-process] CONFIG_JSON GIB [GIB ...]

CONFIG_JSON is `{"model_type": …, **kwargs}`, the config values glmdeploy's architecture facts give
transformers (`Architecture.to_hf_kwargs`); each GIB is one GPU's budget. `--glmdeploy-process`
runs it in a process set up as the `glmdeploy` command's is (`glmdeploy.process`: the collector's
thresholds, no interpreter teardown), which separates what those settings buy from the rest.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.accelerate import infer_auto_device_map

    kwargs = json.loads(argv[0])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    budgets: dict[int | str, int | str] = {i: int(float(g) * 2**30) for i, g in enumerate(argv[1:])}
    device_map = infer_auto_device_map(
        model, max_memory=budgets, no_split_module_classes=set(model._no_split_modules)
    )
    print(json.dumps(device_map, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--glmdeploy-process"]:
        from glmdeploy.process import exit_process, tune_collector

        tune_collector()
        exit_process(main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
