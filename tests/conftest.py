"""Shared fixtures: tiny synthetic shard folders and helpers that run stage launchers in subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distseg.supervise import descendants

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A model small enough for many CPU runs: timm's 0.4M-parameter test ResNet with a narrow head.
TINY_MODEL = {"backbone": "test_resnet", "psa": "none", "aspp_rates": [2, 4], "aspp_channels": 16,
              "low_level_channels": 8, "decoder_channels": 16}


def tiny_stage_config(tmp: Path, **train) -> Path:
    """A StageConfig YAML for tests: tiny model, 64-px crops, no loader workers, OHEM off (CE)."""
    cfg = {"model": TINY_MODEL,
           "data": {"stream": {"num_workers": 0, "shuffle_buffer": 16, "augment": {"crop_size": 64}}},
           "train": {"steps": 4, "log_every": 2, "fisher_batches": 2, "eval_batch_size": 4, **train},
           "optim": {"lr": 0.05},
           "loss": {"kind": "ce"}}
    path = tmp / f"stage_{len(list(tmp.glob('stage_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stage_env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def launch(script: str, *args: str, nproc: int = 1, check: bool = True, timeout: int = 600,
           **kwargs) -> subprocess.CompletedProcess:
    """Run ``launch/<script>`` with python (nproc 1) or the deepspeed launcher (nproc > 1)."""
    path = str(REPO / "launch" / script)
    if nproc == 1:
        cmd = [sys.executable, path, *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), path, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=stage_env(), timeout=timeout, cwd=REPO, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def stage_record(folder: Path) -> dict:
    """A stage folder's ``stage.json``."""
    return json.loads((folder / "stage.json").read_text())


def kill_after_checkpoint(cmd: list[str], out: Path, step: int = 4) -> None:
    """The kill -9 half of every resume test: start a run writing to ``out`` and SIGKILL it, launcher and every rank
    at once, as soon as its step-``step`` checkpoint is complete (it may be writing the next one at that moment).
    Fails unless the run was killed after that checkpoint and before it finished."""
    proc = subprocess.Popen(cmd, env=stage_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = out / "checkpoint" / f"step{step:08d}" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert marker.exists(), "the run ended before its checkpoint"
    assert not stage_record(out)["finished"], "the run must be killed mid-way"


def _shard(tmp: Path, domain: str, n: int, n_unlabeled: int, seed: int) -> Path:
    from distseg.data.shard import shard_dataset
    from distseg.data.synthetic import write_dataset

    raw = write_dataset(tmp / f"raw_{domain}", n, size=(64, 96), domain=domain, seed=seed, n_unlabeled=n_unlabeled)
    out = tmp / f"shards_{domain}"
    shard_dataset(out, images=raw / "images", masks=raw / "masks", unlabeled=raw / "unlabeled",
                  classes=raw / "classes.yaml", split="6:1:1", seed=seed, shard_size=4, force=True)
    return out


@pytest.fixture(scope="session")
def target_shards(tmp_path_factory) -> Path:
    """24 labelled (train/val/test 6:1:1 by image) + 16 unlabelled synthetic target-domain tiles, 4 per shard."""
    return _shard(tmp_path_factory.mktemp("target"), "target", 24, 16, seed=0)


@pytest.fixture(scope="session")
def init_weights(tmp_path_factory) -> Path:
    """Weights of a freshly initialised tiny model: the 'ImageNet' starting point of a hop, offline."""
    import torch

    from distseg.config import from_dict
    from distseg.models import ModelConfig, build_model
    from distseg.models.weights import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "init.safetensors"
    save_weights(build_model(from_dict(ModelConfig, dict(TINY_MODEL, num_classes=6))), path)
    return path
