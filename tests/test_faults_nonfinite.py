"""Non-finite safety: NaN/inf steps are skipped on every rank together and counted, a diverged stage stops with one
error line, the EMA never averages a non-finite student, non-finite weights are never written, loaded or chosen,
and ``predict`` treats non-finite input pixels as nodata."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import REPO, launch, stage_env, tiny_stage_config
from distseg.models.weights import WeightsError, load_weights, save_weights
from distseg.ops.ema import EMA

_GUARD = r"""
import json, os, sys, torch
from distseg.engine.distributed import init_distributed, shutdown
from distseg.engine.deepspeed_engine import build_engine
from distseg.engine.finite import StepGuard
from distseg.engine.loop import train_step
from distseg.stages.config import OptimConfig

env = init_distributed(device="cpu")


def gloo_workers():
    return sum(open(f"/proc/self/task/{t}/comm").read().startswith("pt_gloo") for t in os.listdir("/proc/self/task"))


def run(path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    guard = StepGuard()
    engine, cfg = build_engine(model, model.parameters(), ds_config=path, optim=OptimConfig(lr=0.1), total_steps=8,
                               env=env, guard=guard)
    micro = cfg["train_micro_batch_size_per_gpu"]

    class State:  # what the loop calls after each optimizer step (an EMA would follow the student here)
        def after_step(self, applied):
            self.applied = applied

    class Task:
        poison = False
        state = State()
        def step(self, batches):
            x = torch.rand(micro, 3, 8, 8)
            loss = engine(x).float().square().mean()
            # only rank 1 sees a NaN loss on the poisoned step: every rank must skip it together
            return {"loss": loss * float("nan") if self.poison and env.rank == env.world_size - 1 else loss}
    task, record = Task(), []
    for step in range(4):
        task.poison = step == 2
        before = [p.detach().clone() for p in model.parameters()]
        lr = engine.get_lr()[0]
        result = train_step(task, engine, {}, env.device, cfg["gradient_accumulation_steps"], guard)
        same = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        finite = all(bool(p.isfinite().all()) for p in model.parameters())
        record.append({"applied": result.applied, "unchanged": same, "finite": finite, "lr_before": lr,
                       "lr_after": engine.get_lr()[0], "hook": task.state.applied,
                       "sum": float(sum(p.detach().double().sum() for p in model.parameters()))})
    engine.destroy()  # as Trainer.close does at a stage's end
    return record


out = {os.path.basename(path): run(path) for path in sys.argv[2:]}
# a clean end joins gloo's worker threads: one still busy at interpreter shutdown can abort a finished process
shutdown()
out["gloo_workers_after_shutdown"] = gloo_workers()
# one file per rank: two ranks printing to one pipe can interleave a long line
with open(os.path.join(sys.argv[1], f"rank{env.rank}.json.tmp"), "w") as f:
    json.dump(out, f)
os.replace(os.path.join(sys.argv[1], f"rank{env.rank}.json.tmp"), os.path.join(sys.argv[1], f"rank{env.rank}.json"))
"""


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """ZeRO-0 (the guard in the client optimizer) and ZeRO-1/2 (DeepSpeed's own check plus the guard), 2 ranks;
    then the clean end of the job leaves no process-group thread behind."""
    configs = [str(REPO / "ds_configs" / f"zero{z}_fp32.json") for z in (0, 1, 2)]
    script = tmp_path / "guard.py"
    script.write_text(_GUARD)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29300 + os.getpid() % 100), str(script), str(tmp_path), *configs],
                          capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)
               if (tmp_path / f"rank{rank}.json").exists()}
    assert set(results) == {0, 1}, proc.stdout[-3000:]
    for rank in (0, 1):
        assert results[rank].pop("gloo_workers_after_shutdown") == 0, "shutdown() left process-group threads"
    for name in results[0]:
        for rank in (0, 1):
            steps = results[rank][name]
            assert [s["applied"] for s in steps] == [True, True, False, True], (name, rank, steps)
            assert [s["hook"] for s in steps] == [s["applied"] for s in steps]  # after_step(applied) sees the skip
            assert steps[2]["unchanged"] and all(s["finite"] for s in steps)
            assert steps[2]["lr_after"] == steps[2]["lr_before"], "a skipped step does not advance the schedule"
            assert not steps[1]["unchanged"] and not steps[3]["unchanged"]
        assert [s["sum"] for s in results[0][name]] == [s["sum"] for s in results[1][name]], "replicas diverged"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("warmup", [0, 10])
def test_the_ema_never_averages_a_nonfinite_student(value, warmup):
    student = _net()
    teacher = copy.deepcopy(student)
    ema = EMA(teacher, student, alpha=0.5, warmup_steps=warmup, skip_nonfinite=True)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    ema.update(True)
    moved = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not torch.equal(moved["0.weight"], student[0].weight.detach() - 1.0)
    with torch.no_grad():
        student[2].bias[0] = value
    ema.update(True)
    ema.update(torch.tensor(True))
    assert all(torch.equal(moved[k], v) for k, v in teacher.state_dict().items()), "the teacher took a NaN/inf"
    assert ema.num_updates == 1
    with torch.no_grad():
        student[2].bias[0] = 0.0
    ema.update(True)
    assert ema.num_updates == 2 and all(bool(v.isfinite().all()) for v in teacher.state_dict().values()
                                        if v.is_floating_point())


def test_nonfinite_weights_are_never_written_or_loaded(tmp_path):
    model = _net()
    save_weights(model, tmp_path / "ok.safetensors")
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(WeightsError, match="non-finite"):
        save_weights(model, tmp_path / "nan.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors"], "no file or temporary file is left"
    state = load_file(str(tmp_path / "ok.safetensors"))
    state["2.bias"][0] = float("inf")
    with pytest.raises(WeightsError, match="non-finite"):
        load_weights(_net(), state)


@pytest.mark.slow
def test_a_diverging_ssl_stage_stops_with_one_error_line(tmp_path, target_shards, init_weights):
    """The issue's case: SSL at lr 1e30. Steps are skipped, the stage stops after max_skipped_steps of them in a
    row with exit 2, and no non-finite weights are anywhere in the folder, nor chosen as best."""
    cfg = tiny_stage_config(tmp_path, steps=12, eval_every=1, ckpt_every=0, fisher_batches=0, max_skipped_steps=3)
    out = tmp_path / "ssl"
    proc = launch("ssl.py", "--config", str(cfg), "--data", str(target_shards), "--init", str(init_weights),
                  "--out", str(out), "--set", "optim.lr=1.0e+30", "--set", "ssl.tau=0.5", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "in a row were skipped" in errors[0] and "not finite" in errors[0], proc.stderr[-2000:]
    record = json.loads((out / "stage.json").read_text())
    assert not record["finished"] and not (out / "model.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_steps", 0) for r in rows) >= 1
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r), "skipped steps stay out of the logged means"
    for path in out.rglob("*.safetensors"):  # best/, last/ and the checkpoints' EMA teachers
        assert all(bool(t.isfinite().all()) for t in load_file(str(path)).values() if t.is_floating_point()), path


@pytest.mark.slow
def test_a_diverged_model_is_never_checkpointed_or_exported(tmp_path, target_shards, init_weights):
    """At lr 1e30 a finetune stage's weights either overflow (the stage stops at the first checkpoint that would
    hold them) or stay finite with outputs that overflow (the final validation sees it): one error line either way,
    nothing exported, and every checkpoint left holds finite weights."""
    from distseg.engine.checkpoint import safe_load

    cfg = tiny_stage_config(tmp_path, steps=4, ckpt_every=1, fisher_batches=0)
    out = tmp_path / "ft"
    proc = launch("finetune.py", "--config", str(cfg), "--data", str(target_shards), "--parent", str(init_weights),
                  "--out", str(out), "--set", "optim.lr=1.0e+30", check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "training diverged" in errors[0] and "not finite (NaN/inf)" in errors[0], errors[0]
    assert not (out / "model.safetensors").exists() and not (out / "last").exists()
    for path in (out / "checkpoint").rglob("*.pt"):
        state = safe_load(path, map_location="cpu")
        module = state.get("module") or {}
        assert all(bool(t.isfinite().all()) for t in module.values() if t.is_floating_point()), path


def _float_raster(path, pixels: np.ndarray) -> None:
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", width=pixels.shape[1], height=pixels.shape[0], count=3,
                       dtype="float32", crs="EPSG:32633", transform=from_origin(500000, 4000000, 0.5, 0.5)) as dst:
        dst.write(np.moveaxis(pixels, -1, 0))


def test_predict_treats_nonfinite_pixels_as_nodata(tmp_path):
    from test_predict import conv_model, tiny_class_map

    from distseg.predict import PredictConfig, predict_array, predict_file

    rng = np.random.default_rng(0)
    pixels = rng.random((40, 50, 3), dtype=np.float32)
    clean = predict_array(conv_model(), pixels, 4, PredictConfig(tile=32, scale=1.0))
    pixels[5, 7, 1], pixels[20, 30, :], pixels[0, 0, 2] = np.nan, np.inf, -np.inf
    cfg = PredictConfig(tile=32, scale=1.0)
    pred = predict_array(conv_model(), pixels, 4, cfg)
    bad = ~np.isfinite(pixels).all(axis=-1)
    assert (pred.labels[bad] == 255).all() and (pred.confidence[bad] == 0).all()
    assert np.isfinite(pred.confidence).all()
    # the zeroed nodata pixels do not change the valid ones (a per-pixel model here)
    assert (pred.labels[~bad] == clean.labels[~bad]).all()
    _float_raster(tmp_path / "in.tif", pixels)
    summary = predict_file(conv_model(), tiny_class_map(), tmp_path / "in.tif", tmp_path / "out", cfg,
                           progress=False)
    assert summary["nodata_pixels"] == int(bad.sum()), summary
