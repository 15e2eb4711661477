"""Every shipped DeepSpeed config parses, resolves its batch arithmetic, and (where CPU can) trains one step."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, stage_env
from distseg.config import ConfigError
from distseg.engine.dsconfig import check_device_support, load_ds_config, precision, resolve_ds_config

CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_configs_are_shipped_for_every_zero_stage_and_precision():
    names = {p.stem for p in CONFIGS}
    assert {f"zero{z}_{p}" for z in (0, 1, 2) for p in ("fp32", "bf16", "fp16")} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_resolves_on_one_and_two_ranks(path):
    raw = load_ds_config(path)
    for world in (1, 2):
        cfg = resolve_ds_config(raw, world, source=str(path))
        assert cfg["train_batch_size"] == 8 == (cfg["train_micro_batch_size_per_gpu"]
                                                 * cfg["gradient_accumulation_steps"] * world)
        assert cfg.get("zero_allow_untested_optimizer", False) == (cfg["zero_optimization"]["stage"] >= 1)
    expected = path.stem.split("_")[-1]
    assert precision(raw) == expected
    if expected == "fp16":
        with pytest.raises(ConfigError, match="CUDA"):
            check_device_support(raw, "cpu", source=str(path))
    else:
        check_device_support(raw, "cpu", source=str(path))


def test_batch_arithmetic_and_overrides():
    base = {"train_batch_size": 8}
    assert resolve_ds_config(base, 2, micro_batch=2)["gradient_accumulation_steps"] == 2
    assert resolve_ds_config(base, 1, grad_accum=4)["train_micro_batch_size_per_gpu"] == 2
    assert resolve_ds_config({}, 2, micro_batch=3, grad_accum=2)["train_batch_size"] == 12
    with pytest.raises(ConfigError, match="6"):
        resolve_ds_config(base, 2, micro_batch=3)
    with pytest.raises(ConfigError, match="world size 3"):
        resolve_ds_config(base, 3)
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        resolve_ds_config({"train_batch_size": 8, "zero_optimization": {"stage": 3}}, 1)


def test_bad_config_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_ds_config(bad)
    bad.write_text(json.dumps({"train_batch_size": 8, "optimiser": {}}))
    with pytest.raises(ConfigError, match="optimiser"):
        load_ds_config(bad)


_ONE_STEP = r"""
import sys, torch
from distseg.engine.distributed import init_distributed
from distseg.engine.deepspeed_engine import autocast_context, build_engine
from distseg.stages.config import OptimConfig
env = init_distributed(device="cpu")
for path in sys.argv[1:]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    engine, cfg = build_engine(model, model.parameters(), ds_config=path, optim=OptimConfig(lr=0.1), total_steps=4,
                               env=env)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(cfg["gradient_accumulation_steps"]):
        with autocast_context(cfg, env.device):
            loss = engine(torch.rand(cfg["train_micro_batch_size_per_gpu"], 3, 8, 8)).float().square().mean()
        engine.backward(loss)
        engine.step()
    assert engine.was_step_applied()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters())), path
    print("OK", path)
"""


@pytest.mark.slow
def test_cpu_capable_configs_train_one_step():
    runnable = [str(p) for p in CONFIGS if precision(load_ds_config(p)) != "fp16"]
    proc = subprocess.run([sys.executable, "-c", _ONE_STEP, *runnable], capture_output=True, text=True,
                          env=stage_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("OK ") == len(runnable)


def test_monitor_sections_are_accepted_and_are_not_part_of_a_runs_identity(tmp_path):
    from distseg.engine.dsconfig import monitor_sections, training_sections
    from distseg.stages.config import StageConfig

    shipped = load_ds_config(REPO / "ds_configs" / "cpu_fp32.json")
    sections = {"tensorboard": {"enabled": True, "output_path": "/elsewhere"}, "csv_monitor": {"enabled": True},
                "wandb": {"enabled": False, "project": "p"}}
    path = tmp_path / "monitored.json"
    path.write_text(json.dumps({**shipped, **sections}))
    cfg = load_ds_config(path)
    assert training_sections(cfg) == shipped
    plain = StageConfig(kind="finetune", parent="p", ds_config=str(REPO / "ds_configs" / "cpu_fp32.json"))
    monitored = StageConfig(kind="finetune", parent="p", ds_config=str(path))
    assert monitored.identity(1)["ds_config_resolved"] == plain.identity(1)["ds_config_resolved"], \
        "where the scalars go does not make another run"
    stage = tmp_path / "stage"
    got = monitor_sections(cfg, stage, tensorboard_default=True)
    assert got["tensorboard"] == {"enabled": True, "output_path": "/elsewhere", "job_name": "tensorboard"}
    assert got["csv_monitor"] == {"enabled": True, "output_path": str(stage), "job_name": "csv"}
    assert monitor_sections({}, stage, tensorboard_default=True) == {
        "tensorboard": {"enabled": True, "output_path": str(stage), "job_name": "tensorboard"}}
    assert monitor_sections({}, stage, tensorboard_default=False) == {}
