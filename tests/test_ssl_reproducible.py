"""Two runs of the same SSL stage with loader workers on give the same losses, validation scores and weights."""
from __future__ import annotations

import json

import torch
import yaml
from safetensors.torch import load_file

from conftest import launch, tiny_stage_config


def _ssl_run(tmp, target_shards, init_weights, name: str):
    cfg = tiny_stage_config(tmp, steps=6, log_every=1, eval_every=3)
    data = yaml.safe_load(cfg.read_text())
    data["model"]["psa"] = "parallel"
    data["data"]["stream"]["num_workers"] = 2  # each worker owns a slice of the shards and its own RNG stream
    data["ssl"] = {"tau": 0.5, "tta": ["identity", "hflip"], "ema": {"alpha": 0.9}}
    cfg.write_text(yaml.safe_dump(data))
    out = tmp / name
    launch("ssl.py", "--config", str(cfg), "--data", str(target_shards), "--init", str(init_weights), "--out", str(out))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, load_file(out / "model.safetensors"), load_file(out / "student.safetensors")


def _numbers(metrics):
    """The logged values that depend on the data order and augmentation (timings left out)."""
    keep = []
    for m in metrics:
        timings = ("images_per_s", "time", "wall", "data_wait", "startup_s")
        keep.append({k: v for k, v in m.items() if k not in timings})
    return keep


def test_ssl_with_loader_workers_is_bit_reproducible(tmp_path, target_shards, init_weights):
    first = _ssl_run(tmp_path, target_shards, init_weights, "a")
    second = _ssl_run(tmp_path, target_shards, init_weights, "b")
    logged = [m for m in _numbers(first[0]) if "loss" in m]
    assert len(logged) == 6 and all(m["kept_fraction"] >= 0 for m in logged)
    assert _numbers(first[0]) == _numbers(second[0])
    for one, two in zip(first[1:], second[1:]):  # the EMA teacher, then the student
        assert one.keys() == two.keys()
        for key in one:
            assert torch.equal(one[key], two[key]), key
    # and the runs did train: the exported teacher is not the start model
    start = load_file(init_weights)
    moved = [k for k in start if k in first[1] and start[k].is_floating_point()
             and not torch.equal(start[k], first[1][k])]
    assert moved
