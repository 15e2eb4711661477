"""distseg bench: records of the real stage step, FLOPs against flop_counter, figures, report, CLI errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distseg.bench.config import BenchConfig, peak_tflops
from distseg.bench.fixtures import with_precision
from distseg.bench.records import FIGURES, read_records
from distseg.bench.report import render
from distseg.bench.scaling import default_procs, efficiency_rows
from distseg.bench.timing import TimedStream, count_step_flops, grad_checkpointing_off, percentile
from distseg.bench.train import summarize
from distseg.cli import app
from distseg.config import from_dict
from distseg.models import ModelConfig, build_model
from distseg.models.profile import count_flops
from tests.conftest import REPO, TINY_MODEL, stage_env

RUNNER = CliRunner()
MODEL_SETS = [arg for key, value in TINY_MODEL.items()
              for arg in ("--set", f"model.{key}={json.dumps(value)}")]


def bench_cli(*args: str):
    """Run ``distseg bench ...`` in this process, leaving the environment as it found it."""
    saved = dict(os.environ)
    try:
        return RUNNER.invoke(app, ["bench", *args])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def train_record(out_dir, shards, stage: str, micro_batch: int, steps: int = 3) -> dict:
    """``python -m distseg.bench train`` in a fresh process (the launcher's entry point), its one record."""
    cmd = [sys.executable, "-m", "distseg.bench", "train", "--stage", stage, "--data", str(shards), "--size", "64",
           "--micro-batch", str(micro_batch), "--warmup", "1", "--steps", str(steps), "--workers", "0",
           "--out-dir", str(out_dir), "--device", "cpu", *MODEL_SETS]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_records([out_dir])
    assert len(records) == 1 and "appended 1 record" in proc.stdout
    return records[0]


@pytest.fixture(scope="module")
def ssl_record(tmp_path_factory, target_shards):
    return train_record(tmp_path_factory.mktemp("bench_ssl"), target_shards, "ssl", micro_batch=2)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(from_dict(ModelConfig, dict(TINY_MODEL, num_classes=6)))


def fwd_bwd_flops(model: torch.nn.Module, batch: int, size: int = 64) -> int:
    """The naive reference: flop_counter around one training forward and backward of ``model``."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(batch, 3, size, size)).sum().backward()
    return int(counter.get_total_flops())


def test_train_record_has_every_field_and_sane_figures(ssl_record):
    r = ssl_record
    assert r["kind"] == "train" and r["status"] == "ok" and r["stage"] == "ssl"
    for key in (*FIGURES, "device", "versions", "git_rev", "config_hash", "config", "world_size", "micro_batch"):
        assert key in r, key
    assert r["images_per_s"] > 0 and r["images_per_s_per_gpu"] == pytest.approx(r["images_per_s"])
    assert r["global_batch"] == 2 and r["unlabeled_images_per_s"] == pytest.approx(r["images_per_s"])
    assert 0 <= r["data_wait_fraction"] <= 1
    assert 0 < r["step_time_s"]["median"] <= r["step_time_s"]["p90"]
    assert r["mfu"] is None and r["peak_tflops"] is None  # CPU: no MFU
    assert len(r["peak_memory_gb"]) == 1 and r["peak_memory_gb"][0] > 0
    assert r["device"]["type"] == "cpu" and r["versions"]["torch"] == torch.__version__
    assert r["versions"]["deepspeed"] and re.fullmatch(r"[0-9a-f]{12}", r["config_hash"])
    assert r["tflops_per_gpu"] == pytest.approx(r["flops_per_step"] / 1e12 * r["images_per_s"] / 2, rel=1e-6)


def test_ssl_flops_match_forward_backward_plus_teacher_tta(ssl_record):
    """Student: 2 labelled + 2 unlabelled images forward and backward; EMA teacher: 5 TTA forwards of 2."""
    tta = 5
    model = tiny_model()
    reference = fwd_bwd_flops(model, 4) + tta * count_flops(model, 64, batch=2)["flops"]
    three_forward = 3 * count_flops(model, 64, batch=4)["flops"] + tta * count_flops(model, 64, batch=2)["flops"]
    assert ssl_record["flops_per_step"] == pytest.approx(reference, rel=0.05)
    assert ssl_record["flops_per_step"] == pytest.approx(three_forward, rel=0.05)


def test_distill_flops_match_forward_backward_plus_teacher(tmp_path, target_shards):
    record = train_record(tmp_path, target_shards, "distill", micro_batch=2, steps=2)
    model = tiny_model()
    reference = fwd_bwd_flops(model, 2) + count_flops(model, 64, batch=2)["flops"]
    assert record["flops_per_step"] == pytest.approx(reference, rel=0.05)


def test_recomputation_is_not_counted_as_model_flops():
    cfg = dict(TINY_MODEL, num_classes=6, grad_checkpointing=True)
    model = build_model(from_dict(ModelConfig, cfg)).train()
    x = torch.rand(2, 3, 64, 64)

    def step():
        model(x).sum().backward()

    with_recompute = count_step_flops(step)
    with grad_checkpointing_off(model):
        plain = count_step_flops(step)
    assert with_recompute > plain
    assert count_step_flops(step) == with_recompute  # checkpointing is back on afterwards
    assert plain == fwd_bwd_flops(tiny_model(), 2)


def test_summary_takes_the_slowest_rank_and_computes_mfu_against_the_peak():
    ranks = [{"step_seconds": [1.0, 2.0, 1.0], "wall": 4.0, "waited": 1.0, "peak_gb": 3.0, "flops": 4e12},
             {"step_seconds": [1.5, 1.0, 1.0], "wall": 5.0, "waited": 0.0, "peak_gb": 2.0, "flops": 4e12}]
    s = summarize(ranks, global_batch=16, unlabeled_batch=0, device_name="NVIDIA GeForce RTX 4090",
                  precision="bf16", device_type="cuda", peak_override=None)
    assert s["step_time_s"]["median"] == 1.5 and s["step_time_s"]["p90"] == pytest.approx(1.9)
    assert s["images_per_s"] == pytest.approx(16 * 3 / 5.0) and s["images_per_s_per_gpu"] == pytest.approx(4.8)
    assert s["data_wait_fraction"] == pytest.approx((0.25 + 0.0) / 2) and s["data_wait_fraction_max"] == 0.25
    assert s["tflops_per_gpu"] == pytest.approx(4 * 3 / 5.0) and s["tflops_total"] == pytest.approx(4.8)
    assert s["flops_per_step"] == 8e12 and s["peak_tflops"] == 165.2
    assert s["mfu"] == pytest.approx(2.4 / 165.2)
    assert summarize(ranks, global_batch=16, unlabeled_batch=0, device_name="x", precision="bf16",
                     device_type="cuda", peak_override=100.0)["mfu"] == pytest.approx(0.024)
    cpu = summarize(ranks, global_batch=16, unlabeled_batch=0, device_name="x", precision="fp32",
                    device_type="cpu", peak_override=100.0)
    assert cpu["mfu"] is None and cpu["peak_tflops"] is None


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2), ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H100 PCIe", "fp16", 756.0), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 156.0), ("Tesla T4", "bf16", None)])
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_percentile_equals_numpy():
    values = [3.0, 1.0, 7.5, 2.25, 9.0, 4.0, 4.0]
    for q in (0, 10, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_timed_stream_adds_the_time_blocked_in_next():
    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i

    stream = TimedStream(slow())
    assert list(stream) == [0, 1, 2]
    assert stream.waited >= 0.06


def test_precision_override_replaces_the_precision_section():
    from distseg.engine.dsconfig import precision, resolve_ds_config

    fp16 = {"train_batch_size": 8, "fp16": {"enabled": True}, "zero_optimization": {"stage": 1}}
    bf16 = with_precision(fp16, "bf16")
    assert "fp16" not in bf16 and precision(resolve_ds_config(bf16, 1)) == "bf16"
    assert precision(with_precision(bf16, "fp16")) == "fp16" and precision(with_precision(bf16, "fp32")) == "fp32"
    assert with_precision(fp16, None) == fp16


def test_synthetic_data_holds_several_batches_per_rank_and_epoch():
    from distseg.bench.fixtures import BATCHES_PER_EPOCH, synthetic_sizes

    labelled, unlabelled = synthetic_sizes(32, micro_batch=16, world_size=8, unlabeled_ratio=2)
    assert labelled * 0.8 / 8 >= BATCHES_PER_EPOCH * 16 and unlabelled == 2 * labelled
    assert synthetic_sizes(32, micro_batch=2, world_size=1, unlabeled_ratio=1) == (32, 32)


def test_efficiency_rows_and_default_process_counts():
    runs = [{"world_size": n, "images_per_s": ips, "images_per_s_per_gpu": ips / n,
             "step_time_s": {"median": 0.1}, "data_wait_fraction": 0.0, "mfu": None}
            for n, ips in ((2, 18.0), (1, 10.0))]
    rows = efficiency_rows(runs)
    assert [r["processes"] for r in rows] == [1, 2]
    assert rows[1]["speedup"] == pytest.approx(1.8) and rows[1]["efficiency"] == pytest.approx(0.9)
    assert default_procs(8) == [1, 2, 4, 8] and default_procs(6) == [1, 2, 4, 6] and default_procs(1) == [1]


def test_report_renders_markdown_and_png(tmp_path, ssl_record):
    scaling = {"kind": "scaling", "tag": "t", "stage": "ssl", "backbone": "test_resnet", "size": 64,
               "micro_batch": 2, "device": ssl_record["device"],
               "rows": [{"processes": 1, "images_per_s": 10.0, "images_per_s_per_gpu": 10.0, "speedup": 1.0,
                         "efficiency": 1.0, "step_time_median_s": 0.2, "data_wait_fraction": 0.1, "mfu": None},
                        {"processes": 2, "images_per_s": 18.0, "images_per_s_per_gpu": 9.0, "speedup": 1.8,
                         "efficiency": 0.9, "step_time_median_s": 0.22, "data_wait_fraction": 0.1, "mfu": None}]}
    (tmp_path / "bench.jsonl").write_text(json.dumps(ssl_record) + "\n" + json.dumps(scaling) + "\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # not a records file: ignored in a folder
    result = bench_cli("report", str(tmp_path), "--out", str(tmp_path / "out" / "report"))
    assert result.exit_code == 0, result.output
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"{ssl_record['images_per_s']:.1f}" in md and ssl_record["config_hash"] in md
    assert "| 2 | 18.0 | 9.0 | 1.80x | 90.0 % |" in md
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md2, _ = render(read_records([tmp_path / "bench.jsonl"]), tmp_path / "again")
    assert md2.read_text() == md


def test_bench_infer_record_has_the_train_shape(tmp_path):
    result = bench_cli("infer", "--size", "64", "--batch", "2", "--iters", "2", "--warmup", "1", "--device", "cpu",
                       "--out-dir", str(tmp_path), *[a for k, v in TINY_MODEL.items()
                                                     for a in ("--set", f"{k}={json.dumps(v)}")])
    assert result.exit_code == 0, result.output
    (record,) = read_records([tmp_path])
    assert record["kind"] == "infer" and all(key in record for key in FIGURES)
    assert record["images_per_s"] > 0 and record["mfu"] is None
    assert record["flops_per_step"] == count_flops(tiny_model(), 64, batch=2)["flops"]


@pytest.mark.parametrize("args,message", [
    (["train", "--micro-batch", "4,x"], "--micro-batch"),
    (["train", "--stage", "segment"], "stage"),
    (["train", "--set", "model.backbone=no_such_net"], "no_such_net"),
    (["train", "--steps", "0"], "steps"),
    (["scaling", "--gpus", "2", "--procs", "1,4"], "--gpus 2"),
    (["report", "nowhere"], "nowhere"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = bench_cli(*args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_malformed_record_names_file_and_line(tmp_path):
    (tmp_path / "bench.jsonl").write_text('{"kind": "train"}\nnot json\n')
    result = bench_cli("report", str(tmp_path))
    assert result.exit_code == 2 and "bench.jsonl:2" in result.output


def test_module_entry_moves_the_launcher_rank_into_the_environment(monkeypatch):
    from distseg.bench.__main__ import _take_local_rank

    monkeypatch.setenv("LOCAL_RANK", "0")  # recorded, so the rank set below is undone after the test
    monkeypatch.delenv("LOCAL_RANK")
    assert _take_local_rank(["--local_rank=3", "train", "--steps", "2"]) == ["train", "--steps", "2"]
    assert os.environ["LOCAL_RANK"] == "3"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="micro_batches"):
        BenchConfig(micro_batches=(4, 0))
    with pytest.raises(ValueError, match="peak_tflops"):
        BenchConfig(peak_tflops=-1.0)


def test_cuda_oom_becomes_an_oom_record_that_ends_the_sweep(monkeypatch, tmp_path):
    """The OOM branch without a GPU: ``measure`` raises CUDA's OOM error; provenance is stubbed."""
    from types import SimpleNamespace

    from distseg.bench import train

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(train, "measure", out_of_memory)
    monkeypatch.setattr(train, "base_record", lambda kind, config, device: {"kind": kind, "config": config})
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 8}))
    ws = train.Workspace(tmp_path, "", "", str(tmp_path / "ds.json"))
    env = SimpleNamespace(device=torch.device("cuda"), is_main=True, world_size=2)
    record, fits = train._measure_or_oom(BenchConfig(), ws, env, 16, None)
    assert not fits and record["status"] == "oom" and record["micro_batch"] == 16 and record["global_batch"] == 32
    assert record["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert all(record[key] is None for key in FIGURES)
