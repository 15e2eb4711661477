"""Profiling: FLOP/MAC conventions against hand counts, throughput bookkeeping, and the CLI commands."""
from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from distseg.cli import app
from distseg.models import ModelConfig, build_model
from distseg.models.profile import bench_infer, count_flops, count_params, forward_flops_per_image

SMALL_HEAD = {"aspp_channels": 32, "low_level_channels": 8, "decoder_channels": 32}


def test_conv_flops_are_twice_the_hand_counted_macs():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    stats = count_flops(conv, (16, 20), batch=2)
    macs = 2 * 8 * 3 * 9 * 16 * 20
    assert stats["macs"] == macs and stats["flops"] == 2 * macs
    assert stats["gmacs_per_image"] == pytest.approx(macs / 2 / 1e9)
    assert forward_flops_per_image(conv, (16, 20)) == macs  # one image: half the batch's MACs, times 2
    assert conv.training  # counting runs in eval mode and restores the mode


def test_psa_cost_matches_hand_count_and_meta_equals_cpu():
    """PSA on the 96-channel stride-16 map of test_resnet at 64 px: 4×4 positions."""
    cfg = ModelConfig(backbone="test_resnet", **SMALL_HEAD)
    with_psa = count_flops(build_model(cfg), 64)["macs"]
    without = count_flops(build_model(ModelConfig(backbone="test_resnet", psa="none", **SMALL_HEAD)), 64)["macs"]
    c, h, hw = 96, 48, 16
    channel = c * hw + c * h * hw + h * hw + h * c  # query, value, value·softmax(query), up
    spatial = c * h + c * h * hw + h * hw  # query on the pooled vector, value, product
    assert with_psa - without == channel + spatial
    with torch.device("meta"):
        meta = build_model(cfg)
    assert count_flops(meta, 64)["macs"] == with_psa


def test_count_params_trainable_only():
    model = build_model(ModelConfig(backbone="test_resnet", **SMALL_HEAD))
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert count_params(model, trainable_only=True) == head
    assert count_params(model) == head + sum(p.numel() for p in model.backbone.parameters())


class _Sleeper(torch.nn.Module):
    """A model whose forward takes at least 5 ms and counts its calls."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(0.005)
        return x * self.scale


def test_bench_infer_rows_warmup_and_timing():
    model = _Sleeper()
    rows = bench_infer(model, 8, batch_sizes=(1, 4), channels_last=True, warmup=2, iters=3)
    assert model.calls == 2 * (2 + 3) and not model.training
    assert [r["batch"] for r in rows] == [1, 4]
    for row in rows:
        assert row["ms_per_batch"] >= 5.0
        assert row["images_per_s"] == pytest.approx(1e3 * row["batch"] / row["ms_per_batch"])
        assert (row["channels_last"], row["dtype"], row["device"]) == (True, "fp32", "cpu")


def test_bench_infer_bf16_on_a_real_model():
    model = build_model(ModelConfig(backbone="test_resnet", **SMALL_HEAD))
    (row,) = bench_infer(model, 32, batch_sizes=(2,), dtype=torch.bfloat16, warmup=1, iters=1)
    assert row["images_per_s"] > 0 and row["dtype"] == "bf16"


@pytest.mark.parametrize("kwargs, match", [({"dtype": "fp16"}, "fp16 autocast needs CUDA"),
                                           ({"dtype": "int8"}, "dtype must be one of"),
                                           ({"iters": 0}, "iters >= 1"),
                                           ({"batch_sizes": (0,)}, "positive batch")])
def test_bench_infer_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench_infer(_Sleeper(), 8, **kwargs)


def test_cli_flops_reports_per_image_and_per_batch(tmp_path):
    result = CliRunner().invoke(app, ["flops", "--set", "backbone=test_resnet", "--set", "aspp_channels=32",
                                      "--size", "64", "--batch", "8", "--json", str(tmp_path / "f.json")])
    assert result.exit_code == 0, result.output
    assert "GMACs" in result.output and "FLOPs = 2 x MACs" in result.output
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["model"]["backbone"] == "test_resnet" and data["size"] == 64
    assert data["per_batch"]["macs"] == 8 * data["per_image"]["macs"]
    assert data["per_image"]["flops"] == 2 * data["per_image"]["macs"]
    cfg = ModelConfig(backbone="test_resnet", aspp_channels=32)
    assert data["per_image"]["macs"] == count_flops(build_model(cfg), 64)["macs"]


def test_cli_bench_infer_saves_json(tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["bench-infer", "--set", "backbone=test_resnet", "--size", "32", "--batch", "2",
                                      "--warmup", "0", "--iters", "1", "--channels-last", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["channels_last"] for r in rows)


@pytest.mark.parametrize("args, match", [
    (["flops", "--set", "backbone=resnet202"], "not registered"),
    (["flops", "--model", "missing.yaml"], "no such file"),
    (["bench-infer", "--set", "backbone=test_resnet", "--dtype", "fp16"], "fp16 autocast needs CUDA"),
    (["bench-infer", "--set", "backbone=test_resnet", "--device", "tpu:x"], "--device"),
])
def test_cli_bad_input_exits_2_with_one_line(args, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0]
