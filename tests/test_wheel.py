"""An install from a built wheel works away from the source tree: configs and schema ship inside."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only the wheel of glmdeploy in it.

    Its dependencies come from this environment's site-packages through a `.pth` line, which adds
    the folder without running the `.pth` files inside it, so the editable install of the source
    tree stays invisible.
    """
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(REPO)],
        check=True, timeout=300,
    )  # fmt: skip
    wheel = next(dist.glob("glmdeploy-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "glmdeploy/conf/config.yaml" in names and "glmdeploy/conf/gpus/2x24gib.yaml" in names
    assert "glmdeploy/schemas/deployment.schema.json" in names
    assert any(n.startswith("glmdeploy/model/anatomies/") and n.endswith(".json") for n in names)
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    target = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", target, str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    Path(target, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def run(python: Path, *args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GLMDEPLOY_CONFIG_PATH")}
    env["GLMDEPLOY_CACHE"] = str(cache)
    return subprocess.run(
        [str(python), "-m", "glmdeploy", *args],
        cwd="/", env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_installed_wheel_validates_and_plans_from_another_directory(
    installed: Path, tmp_path: Path
) -> None:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(installed), "-c", "import glmdeploy; print(glmdeploy.__file__)"],
        cwd="/", env=clean, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert not where.startswith(str(REPO)), f"imported the source tree: {where}"
    result = run(installed, "validate", "gpus=2x24gib", "precision=bf16", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok: gpus=2x24gib precision=bf16" in result.stdout
    out = tmp_path / "run"
    result = run(installed, "plan", "--json", "gpus=cpu", f"hydra.run.dir={out}", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True and (out / "run.json").is_file()
