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


# ------------------------------------------------------------------------------ the per-device fast path

@pytest.mark.parametrize("device, flags, bf16, channels_last", [
    ("cpu", {"avx2", "fma"}, False, False),
    ("cpu", {"avx2", "avx512f", "avx512bw"}, False, False),      # AVX-512 without its bf16 extension
    ("cpu", {"avx512f", "avx512_bf16"}, True, True),
    ("cpu", {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}, True, True),
    ("cpu", set(), False, False),                                # no /proc/cpuinfo: assume nothing
    ("cuda", set(), True, False),                                # GPU: bf16 autocast, layout unchanged
])
def test_fast_path_decision_table(device, flags, bf16, channels_last):
    from distseg.engine.dsconfig import fast_path

    path = fast_path(device, frozenset(flags))
    assert (path.bf16, path.channels_last) == (bf16, channels_last)


def test_auto_config_resolves_per_machine_and_records_the_choice():
    from distseg.engine.dsconfig import deepspeed_sections, resolve_fast_path

    raw = load_ds_config(REPO / "ds_configs" / "cpu_auto.json")
    assert precision(raw) == "auto"
    amx = resolve_fast_path(resolve_ds_config(raw, 1), "cpu", frozenset({"amx_bf16", "avx512f"}))
    assert amx["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and precision(amx) == "bf16"
    assert amx["memory_format"] == "channels_last" and "amx_bf16" in amx["fast_path"]
    avx2 = resolve_fast_path(resolve_ds_config(raw, 1), "cpu", frozenset({"avx2"}))
    assert precision(avx2) == "fp32" and avx2["memory_format"] == "contiguous"
    assert "memory_format" not in deepspeed_sections(amx) and "fast_path" not in deepspeed_sections(amx)
    fixed = load_ds_config(REPO / "ds_configs" / "cpu_fp32.json")
    assert resolve_fast_path(fixed, "cpu", frozenset({"amx_bf16"})) == fixed, "cpu_fp32 means fp32 everywhere"


def test_auto_values_are_checked_when_the_file_is_read(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "torch_autocast": {"enabled": "yes"}}))
    with pytest.raises(ConfigError, match="bad.json.*torch_autocast.enabled"):
        load_ds_config(bad)
    bad.write_text(json.dumps({"train_batch_size": 8, "memory_format": "nhwc"}))
    with pytest.raises(ConfigError, match="bad.json.*memory_format"):
        load_ds_config(bad)


def test_resolved_choice_is_recorded_in_stage_json(tmp_path, target_shards, init_weights):
    """A stage run with the auto config writes this machine's decision into stage.json's ds_config_resolved."""
    from conftest import launch, stage_record, tiny_stage_config
    from distseg.engine.dsconfig import cpu_flags, fast_path

    out = tmp_path / "ft"
    launch("finetune_head.py", "--config", str(tiny_stage_config(tmp_path, steps=2, fisher_batches=0)), "--data",
           str(target_shards), "--parent", str(init_weights), "--ds_config", "ds_configs/cpu_auto.json", "--out",
           str(out))
    resolved = stage_record(out)["config"]["ds_config_resolved"]
    expected = fast_path("cpu", cpu_flags())
    assert resolved["torch_autocast"]["enabled"] is expected.bf16
    assert resolved["memory_format"] == ("channels_last" if expected.channels_last else "contiguous")
    assert resolved["fast_path"] == expected.reason


def _tiny_segmenter() -> "torch.nn.Module":
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=2,
                         dilation=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1))


def test_channels_last_inputs_give_the_contiguous_outputs_and_gradients():
    import copy

    import torch

    from distseg.engine.deepspeed_engine import channels_last_inputs

    plain = _tiny_segmenter()
    fast = copy.deepcopy(plain)
    channels_last_inputs(fast)
    channels_last_inputs(fast)  # idempotent: one hook
    assert len(fast._forward_pre_hooks) == 1
    x = torch.rand(2, 3, 32, 32)
    out_plain, out_fast = plain(x), fast(x)
    assert out_fast.is_contiguous(memory_format=torch.channels_last) and not out_plain.is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    out_plain.square().mean().backward()
    out_fast.square().mean().backward()
    for a, b in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_cpu_trains_a_tiny_model():
    """The AMX path's arithmetic, wherever the test runs (bf16 is emulated without AMX): finite, decreasing loss."""
    import torch
    import torch.nn.functional as F

    from distseg.engine.deepspeed_engine import autocast_context, channels_last_inputs

    model = _tiny_segmenter()
    channels_last_inputs(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    x = torch.rand(4, 3, 32, 32)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()  # a learnable per-pixel rule
    context = autocast_context({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, torch.device("cpu"))
    losses = []
    for _ in range(30):
        with context:
            logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights stay fp32 under autocast"
