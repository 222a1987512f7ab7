"""The `vllm serve` option names of the vLLM version glmdeploy targets, and the check on them.

`serve_flags_0.33.0.txt` (beside this module) lists every long option `vllm serve` accepts in
vLLM 0.33.0, derived from its source. A key of a `vllm serve --config` YAML file is such a name
without `--`; vLLM turns `key: true` into `--key`, drops `key: false` silently (it looks for
`--no-key` on the wrong parser) and turns `null` into the string "None", so glmdeploy writes only
names from this list, never a `no-*` name, never `false` and never `null`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from typing import Any

from glmdeploy.engines.vllm.facts import VLLM_VERSION

FLAGS_FILE = f"serve_flags_{VLLM_VERSION}.txt"


@functools.cache
def serve_flags() -> frozenset[str]:
    """Every long option name of `vllm serve` in `VLLM_VERSION`, without `--`."""
    text = resources.files(__package__).joinpath(FLAGS_FILE).read_text(encoding="utf-8")
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def bad_config_keys(config: Mapping[str, Any]) -> list[str]:
    """Why keys or values of a `--config` mapping would not reach vLLM as written (empty: none).

    Underscores and hyphens are the same to vLLM; a key must name an option of `VLLM_VERSION`,
    must not be a `no-*` negation, and its value must be neither `false` nor `null`.
    """
    flags = serve_flags()
    out: list[str] = []
    for key, value in config.items():
        name = str(key).replace("_", "-")
        if name not in flags:
            out.append(f"{key}: not an option of vllm serve {VLLM_VERSION}")
        elif name.startswith("no-"):
            out.append(f"{key}: a negation, which vLLM drops from a config file")
        if value is False or value is None:
            out.append(f"{key}: {value!r} is dropped or misread by vLLM; leave the key out")
    return out
