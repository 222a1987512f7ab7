"""Benchmark: how long `glmdeploy plan`, a plan sweep and `validate` take, vs bare transformers.

Every scenario is a fresh process, timed end to end (wall clock, and CPU time of the process and
everything it waited for), run in interleaved rounds; the table shows medians and ratios:

- warm plan: GLM-4-9B on 2×24 GiB, its anatomy cached (shipped model options are pre-cached).
- first plan, empty cache: the same with `GLMDEPLOY_CACHE` pointing at a fresh directory; the
  anatomy of a shipped option ships with glmdeploy, so this is a warm plan too.
- cold plan: the same model as a local checkpoint directory (its config.json, no weights) with an
  empty cache: nothing shipped or cached, so the anatomy is built (torch, transformers, meta model).
- 8-job plan sweep of the cached model (`gpus` × `precision` × `runtime`, every job recorded).
- validate, and the same cold/warm pair for a GLM-4.5-Air-sized MoE (warm: the shipped option).
- bare transformers: `benchmarks/bare_transformers_plan.py`, the same meta model placed by
  transformers' `infer_auto_device_map` under the same budgets (what a user writes without us);
  and the same script in a process set up as glmdeploy's is (`glmdeploy.process`: collector
  thresholds, no teardown), to show what glmdeploy's own work costs apart from those settings
  (printed under the table as cold plan ÷ that).

A first untimed round writes the bytecode caches, as any installed Python has them
(`PYTHONDONTWRITEBYTECODE` is removed from the children's environment). The machine's load average
is printed: on a shared machine, wall-clock times stretch with it while CPU times do not.

    python benchmarks/cli_latency.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from glmdeploy.config.deployments import load_deployment
from glmdeploy.model.hf_config import config_from_architecture

BARE = Path(__file__).resolve().parent / "bare_transformers_plan.py"
GLM9B = ["model=glm-4-9b-chat-hf", "gpus=2x24gib"]
AIR = ["model=glm-4.5-air", "gpus=8x80gib"]
TUNED = "bare transformers, glmdeploy's process settings"
SWEEP = ["gpus=2x24gib,4x24gib", "precision=bf16,fp16", "runtime=chat,batch",
         "model=glm-4-9b-chat-hf"]  # fmt: skip


@dataclass
class Scenario:
    name: str
    argv: Callable[[Path], list[str]]  # the command line, given a fresh scratch directory
    fresh_cache: bool = False  # GLMDEPLOY_CACHE: a new empty directory each run (else shared)
    targets: tuple[tuple[str, float], ...] = ()  # ("s" | scenario name, at most): the issue's
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def glmdeploy(*args: str) -> list[str]:
    return [sys.executable, "-m", "glmdeploy", *args]


def checkpoint_dir(root: Path, overrides: list[str]) -> tuple[Path, str]:
    """A directory holding only the config.json of a model option, and that config as JSON
    keyword arguments (what the bare script builds from)."""
    arch = load_deployment(overrides).deployment.model.architecture
    assert arch is not None
    directory = root / overrides[0].split("=")[1]
    directory.mkdir(parents=True, exist_ok=True)
    config_from_architecture(arch).to_json_file(str(directory / "config.json"))
    return directory, json.dumps({"model_type": arch.model_type, **arch.to_hf_kwargs()})


def scenarios(root: Path) -> list[Scenario]:
    glm_dir, glm_kwargs = checkpoint_dir(root, GLM9B)
    air_dir, air_kwargs = checkpoint_dir(root, AIR)

    def run_dir(d: Path) -> str:
        return f"hydra.run.dir={d / 'run'}"

    bare, warm = "bare transformers (GLM-4-9B)", "warm plan (GLM-4-9B)"
    return [
        Scenario(warm, lambda d: glmdeploy("plan", *GLM9B, run_dir(d)),
                 targets=(("s", 0.6), (bare, 0.2))),
        Scenario("first plan, empty cache (shipped anatomy)",
                 lambda d: glmdeploy("plan", *GLM9B, run_dir(d)), fresh_cache=True),
        Scenario("cold plan (GLM-4-9B checkpoint, anatomy built)",
                 lambda d: glmdeploy("plan", "model=local", f"model.source.path={glm_dir}",
                                     "gpus=2x24gib", run_dir(d)),
                 fresh_cache=True, targets=((bare, 1.0),)),
        Scenario("8-job plan sweep (cached)",
                 lambda d: glmdeploy("plan", "-m", *SWEEP, f"hydra.sweep.dir={d / 'sweep'}"),
                 targets=((warm, 2.0),)),
        Scenario("validate", lambda d: glmdeploy("validate", *GLM9B), targets=(("s", 0.3),)),
        Scenario(bare, lambda d: [sys.executable, str(BARE), glm_kwargs, "23", "23"]),
        Scenario(TUNED + " (GLM-4-9B)",
                 lambda d: [sys.executable, str(BARE), "--glmdeploy-process", glm_kwargs, "23",
                            "23"]),
        Scenario("warm plan (GLM-4.5-Air-sized MoE)",
                 lambda d: glmdeploy("plan", *AIR, run_dir(d)), targets=(("s", 0.6),)),
        Scenario("cold plan (GLM-4.5-Air-sized MoE checkpoint)",
                 lambda d: glmdeploy("plan", "model=local", f"model.source.path={air_dir}",
                                     "gpus=8x80gib", run_dir(d)),
                 fresh_cache=True, targets=(("s", 3.0),)),
        Scenario("bare transformers (GLM-4.5-Air-sized)",
                 lambda d: [sys.executable, str(BARE), air_kwargs, *["79"] * 8]),
        Scenario(TUNED + " (GLM-4.5-Air-sized)",
                 lambda d: [sys.executable, str(BARE), "--glmdeploy-process", air_kwargs,
                            *["79"] * 8]),
    ]  # fmt: skip


def run_once(scenario: Scenario, root: Path, cache: Path, record: bool) -> None:
    scratch = Path(tempfile.mkdtemp(dir=root))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    fresh = Path(tempfile.mkdtemp(dir=root))
    env["GLMDEPLOY_CACHE"] = str(fresh if scenario.fresh_cache else cache)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(scenario.argv(scratch), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{scenario.name} failed ({proc.returncode}):\n{proc.stderr}")
    if record:
        scenario.wall.append(wall)
        scenario.cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


def imports_torch(argv: list[str], cache: Path) -> bool:
    """Whether the command imports torch (from `python -X importtime`)."""
    env = {**os.environ, "GLMDEPLOY_CACHE": str(cache)}
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True,
                          text=True, env=env)  # fmt: skip
    return any(line.rstrip().endswith("| torch") for line in proc.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "cache"
        todo = scenarios(root)
        load_before = os.getloadavg()
        for round_ in range(args.repeats + 1):  # round 0 warms bytecode and the shared cache
            for scenario in todo:
                run_once(scenario, root, cache, record=round_ > 0)
        argv = glmdeploy("plan", *GLM9B, f"hydra.run.dir={root / 'x'}")
        torch_warm = imports_torch(argv, cache)
        load_after = os.getloadavg()
    print_table(todo, torch_warm, load_before, load_after, args.repeats)


def print_table(todo: list[Scenario], torch_warm: bool, load_before: tuple[float, ...],
                load_after: tuple[float, ...], repeats: int) -> None:  # fmt: skip
    """A Markdown table: medians and each target, met or missed by how much (wall and CPU)."""
    wall = {s.name: statistics.median(s.wall) for s in todo}
    cpu = {s.name: statistics.median(s.cpu) for s in todo}
    print(f"medians of {repeats} interleaved runs; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after ({os.cpu_count()} cores); warm plan imports torch: "
          f"{'yes' if torch_warm else 'no'}\n")  # fmt: skip
    print("| scenario | wall s | CPU s | target | wall | CPU |")
    print("|---|---|---|---|---|---|")
    for s in todo:
        for i, (ref, limit) in enumerate(s.targets or (("", 0.0),)):
            target, by_wall, by_cpu = "", "", ""
            if ref == "s":
                target = f"≤ {limit:g} s"
                by_wall, by_cpu = _verdict(wall[s.name], limit), _verdict(cpu[s.name], limit)
            elif ref:
                target = f"≤ {limit:g}× {ref}"
                by_wall = _verdict(wall[s.name] / wall[ref], limit, "×")
                by_cpu = _verdict(cpu[s.name] / cpu[ref], limit, "×")
            name, times = (
                (s.name, f"{wall[s.name]:.2f} | {cpu[s.name]:.2f}") if i == 0 else ("", " | ")
            )
            print(f"| {name} | {times} | {target} | {by_wall} | {by_cpu} |")

    print()
    for cold, model in (
        ("cold plan (GLM-4-9B checkpoint, anatomy built)", "GLM-4-9B"),
        ("cold plan (GLM-4.5-Air-sized MoE checkpoint)", "GLM-4.5-Air-sized"),
    ):
        tuned = f"{TUNED} ({model})"  # what glmdeploy's own work costs, process settings aside
        print(
            f"{cold} ÷ {tuned}: {wall[cold] / wall[tuned]:.2f}× wall, "
            f"{cpu[cold] / cpu[tuned]:.2f}× CPU"
        )


def _verdict(value: float, limit: float, unit: str = " s") -> str:
    return f"{value:.2f}{unit} " + ("met" if value <= limit else f"missed by {value / limit:.1f}×")


if __name__ == "__main__":
    main()
