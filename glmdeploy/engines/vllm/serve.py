"""`glmdeploy serve engine=vllm`: export the checked config, then run `vllm serve --config FILE`.

vLLM is not a dependency of glmdeploy (it pins its own torch and transformers): it is found as a
`vllm` executable on PATH or as an importable package (`python -m vllm.entrypoints.cli.main`).
Without it, the command this node would run is printed with how to install vLLM, exit code 3.
vLLM's output streams through; SIGTERM and SIGINT are forwarded to it (it runs in its own process
group, so a terminal's Ctrl-C reaches it once), and its exit code is returned.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from glmdeploy.config.settings import Deployment
from glmdeploy.engines.vllm.facts import VLLM_VERSION
from glmdeploy.problems import ExitCode

INSTALL_HINT = (
    f"install vLLM {VLLM_VERSION} in an environment of its own (it pins its own torch and "
    f"transformers): python3 -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm=={VLLM_VERSION}"
    ", then put ~/vllm-env/bin on PATH"
)


def vllm_command() -> list[str] | None:
    """How to start vLLM's CLI here: the `vllm` executable, the package, or None (absent)."""
    exe = shutil.which("vllm")
    if exe:
        return [exe]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    return None


def config_dir() -> Path:
    """Where `serve` writes the configs it starts vLLM with (glmdeploy's cache)."""
    from glmdeploy.loading.embedded import cache_root

    return cache_root() / "vllm"


def serve_with_vllm(deployment: Deployment, *, host: str, port: int, json_out: bool) -> int:
    """Check the fit, write vLLM's config, and run vLLM's server on this node until it exits.

    Returns vLLM's exit code (128 + N when a signal N ended it), or 3 when vLLM is not
    installed (the command is printed with how to install it).

    Raises:
        ConfigError, HardwareError: what vLLM would refuse, or the GPUs.
        VllmDoesNotFit: the deployment does not fit vLLM's memory rules (nothing starts).
    """
    import hashlib

    from glmdeploy.engines.vllm.export import export_vllm

    key = hashlib.sha256(f"{deployment.to_json()} {host} {port}".encode()).hexdigest()[:16]
    path = config_dir() / f"{deployment.model.name}-{key}.yaml"
    export = export_vllm(deployment, config_path=path, host=host, port=port)
    path.parent.mkdir(parents=True, exist_ok=True)
    export.write(path)
    node = export.commands[deployment.launch.node_rank]
    out = sys.stderr if json_out else sys.stdout
    if not json_out:
        from glmdeploy.engines.vllm.render import print_export

        print_export(export)
    base = vllm_command()
    if base is None:
        print(f"vLLM is not installed here. The command for node {node.node}:\n  {node.shell}\n"
              f"config: {path}\n{INSTALL_HINT}", file=out)  # fmt: skip
        if json_out:
            _print_json(False, ExitCode.HARDWARE, path, node.shell, install=INSTALL_HINT)
        return int(ExitCode.HARDWARE)
    argv = [*base, *node.argv[1:]]  # the config holds host and port
    print(f"starting vLLM (config {path}): {node.shell}", file=out, flush=True)
    code = run_forwarding_signals(argv, {**os.environ, **export.env}, to_stderr=json_out)
    if json_out:
        _print_json(code == 0, code, path, node.shell)
    return code


def run_forwarding_signals(argv: list[str], env: dict[str, str], *, to_stderr: bool) -> int:
    """Run `argv` in its own process group, passing SIGTERM/SIGINT on; its exit code.

    Its output streams to ours; with `to_stderr` its stdout goes to our stderr (stdout then
    carries JSON only).
    """
    pipe = subprocess.PIPE if to_stderr else None
    proc = subprocess.Popen(argv, env=env, stdout=pipe, text=True, process_group=0)
    copier = None
    if proc.stdout is not None:
        source = proc.stdout

        def copy() -> None:
            for line in source:
                print(line, end="", file=sys.stderr, flush=True)

        copier = threading.Thread(target=copy, daemon=True)
        copier.start()
    previous: dict[signal.Signals, Any] = {}

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward)
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if copier is not None:
        copier.join(timeout=5)
    return 128 - code if code < 0 else code


def _print_json(ok: bool, code: int, path: Path, command: str, **extra: str) -> None:
    payload = {"ok": ok, "exit_code": int(code), "engine": "vllm", "config": str(path),
               "command": command, **extra}  # fmt: skip
    print(json.dumps(payload, indent=2))
