"""Replay's pre-flight: every difference between a recorded environment/checkpoint and now."""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path
from typing import Any

from glmdeploy.config.settings import GIB
from glmdeploy.hardware.environment import environment_facts
from glmdeploy.records.record import RunRecord
from glmdeploy.records.replay import differences

ENV: dict[str, Any] = {
    "python": "3.11.9",
    "platform": "Linux-6.8.0-x86_64-with-glibc2.39",
    "packages": {"glmdeploy": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0"},
    "torch_cuda": "12.4",
    "nvidia_driver": "550.54.15",
    "cuda_driver": "12.4",
    "nvml_error": None,
    "gpus": [
        {
            "physical_id": i,
            "name": "NVIDIA RTX 4090",
            "uuid": f"GPU-{i}",
            "total_bytes": 24 * GIB,
            "compute_capability": [8, 9],
        }
        for i in range(2)
    ],
    "env": {"CUDA_VISIBLE_DEVICES": None, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
}
CHECKPOINT = {"kind": "local", "path": "/ckpt", "layout": "native", "fingerprint": "a" * 64}


def recorded() -> RunRecord:
    return RunRecord("bench", {}, environment=copy.deepcopy(ENV), checkpoint=dict(CHECKPOINT))


def test_nothing_changed_means_no_differences() -> None:
    assert differences(recorded(), copy.deepcopy(ENV), dict(CHECKPOINT)) == []


def test_this_machine_is_stable_between_two_looks() -> None:
    record = RunRecord("plan", {}, environment=environment_facts(), checkpoint=None)
    assert differences(record, environment_facts(), None) == []


def test_versions_drivers_and_variables_that_changed_are_named() -> None:
    now = copy.deepcopy(ENV)
    now["packages"]["torch"] = "2.14.1"
    del now["packages"]["transformers"]
    now["packages"]["accelerate"] = "1.15.0"
    now["nvidia_driver"] = "560.28.03"
    now["env"]["CUDA_VISIBLE_DEVICES"] = "0,1"
    assert differences(recorded(), now, dict(CHECKPOINT)) == [
        "torch 2.13.0 → 2.14.1",
        "transformers 5.24.0 → absent",
        "NVIDIA driver 550.54.15 → 560.28.03",
        "CUDA_VISIBLE_DEVICES (unset) → '0,1'",
        "accelerate absent → 1.15.0",
    ]


def test_gpu_count_names_memory_and_cards_that_changed_are_named() -> None:
    now = copy.deepcopy(ENV)
    now["gpus"] = [
        dict(
            now["gpus"][0],
            name="NVIDIA A100-SXM4-80GB",
            total_bytes=80 * GIB,
            compute_capability=[8, 0],
            uuid="GPU-new",
        )
    ]
    assert differences(recorded(), now, dict(CHECKPOINT)) == [
        "GPU count 2 → 1",
        "GPU 0 NVIDIA RTX 4090 (24.0 GiB) → NVIDIA A100-SXM4-80GB (80.0 GiB)",
        "GPU 0 compute capability 8.9 → 8.0",
        "GPU 0 uuid GPU-0 → GPU-new",
        "GPU 1 NVIDIA RTX 4090 (24.0 GiB) → absent",
        "GPU 1 compute capability 8.9 → absent",
        "GPU 1 uuid GPU-1 → absent",
    ]


def test_a_changed_or_missing_checkpoint_is_named() -> None:
    changed = dict(CHECKPOINT, fingerprint="b" * 64)
    assert differences(recorded(), copy.deepcopy(ENV), changed) == [
        f"checkpoint fingerprint {'a' * 12}… → {'b' * 12}…"
    ]
    gone = dict(CHECKPOINT, fingerprint=None, fingerprint_error="the directory does not exist")
    assert differences(recorded(), copy.deepcopy(ENV), gone) == [
        f"checkpoint fingerprint {'a' * 12}… → unreadable (the directory does not exist)"
    ]
    moved = dict(CHECKPOINT, path="/elsewhere")
    assert differences(recorded(), copy.deepcopy(ENV), moved) == [
        "checkpoint local /ckpt (native layout) → local /elsewhere (native layout)"
    ]
    assert differences(recorded(), copy.deepcopy(ENV), None) == [
        "checkpoint local /ckpt (native layout) → none (no weights)",
        f"checkpoint fingerprint {'a' * 12}… → absent",
    ]


def test_two_replays_in_the_same_second_keep_both_records(cli: Any, tmp_path: Path) -> None:
    """A replay's directory is named to the second: a second replay wrote over the first."""
    run = tmp_path / "run"
    assert cli("plan", "gpus=2x24gib", f"hydra.run.dir={run}").code == 0
    now = datetime.datetime.now()
    for s in range(-1, 30):  # every name a replay can get while this test runs: all taken
        when = (now + datetime.timedelta(seconds=s)).strftime("%Y%m%d-%H%M%S")
        (run / "replays" / when).mkdir(parents=True, exist_ok=True)
        (run / "replays" / when / "run.json").write_text("theirs\n")
    assert cli("replay", str(run)).code == 0
    assert cli("replay", str(run)).code == 0
    mine = sorted(run.glob("replays/*-*-*/run.json"))  # STAMP-1, STAMP-2
    assert len(mine) == 2 and all(json.loads(p.read_text())["status"] == "ok" for p in mine)
    assert all(p.read_text() == "theirs\n" for p in run.glob("replays/*/run.json") if p not in mine)
