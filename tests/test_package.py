"""The package is self-contained: a non-editable wheel in a fresh venv runs recipes and stages outside the repo."""
from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_MODEL

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    for key in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        full_env.pop(key, None)
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel built from the checkout, installed (not editable) into a new venv whose only other packages are the
    test environment's dependencies (torch, deepspeed, ...), reached through a path file."""
    tmp = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(REPO)],
         cwd=tmp)
    wheel = next(tmp.glob("distseg-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp)
                   .stdout.strip())
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # .pth files there are not run
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)], cwd=tmp)
    return venv


def test_wheel_holds_configs_recipes_and_runs_outside_the_repo(installed, tmp_path, target_shards, init_weights):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    py, cli = installed / "bin" / "python", installed / "bin" / "distseg"
    where = _run([str(py), "-c", "import distseg, distseg.resources as r; print(distseg.__file__); "
                  "print(r.folder('ds_configs')); print(r.folder('recipes'))"], cwd=outside).stdout.split()
    assert all(str(installed) in w for w in where), where  # the installed copy, not the checkout
    assert (Path(where[1]) / "zero1_bf16.json").is_file() and (Path(where[2]) / "demo.yaml").is_file()
    dry = _run([str(cli), "run", "demo", "--dry-run", "--var", f"DATA={tmp_path}", "--out", str(tmp_path / "run")],
               cwd=outside)
    assert dry.stdout.count("-m distseg.stages") == 12 and not (tmp_path / "run").exists()
    config = outside / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "pretrained": None},
                                      "data": {"stream": {"num_workers": 0, "augment": {"crop_size": 64}}},
                                      "train": {"steps": 2, "fisher_batches": 0}, "loss": {"kind": "ce"}}))
    init = tmp_path / "init"
    _run([str(py), "-m", "distseg.stages", "finetune", "--config", str(config), "--data", str(target_shards),
          "--parent", str(init_weights), "--ds_config", "ds_configs/cpu_fp32.json", "--out", str(init)],
         cwd=outside)
    assert (init / "model.safetensors").is_file() and '"finished": true' in (init / "stage.json").read_text()

