"""distseg bench scaling: real deepspeed launches at 1 and 2 CPU processes on generated synthetic data."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from distseg.bench.records import read_records
from distseg.cli import app
from tests.conftest import TINY_MODEL


@pytest.mark.slow
def test_scaling_at_one_and_two_processes_writes_both_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    sets = [a for k, v in TINY_MODEL.items() for a in ("--set", f"model.{k}={json.dumps(v)}")]
    result = CliRunner().invoke(app, [
        "bench", "scaling", "--gpus", "2", "--stage", "ssl", "--size", "64", "--micro-batch", "2", "--warmup", "1",
        "--steps", "2", "--workers", "0", "--set", "synthetic_images=10", "--device", "cpu",
        "--out-dir", str(tmp_path), *sets])
    assert result.exit_code == 0, result.output
    records = read_records([tmp_path])
    runs = [r for r in records if r["kind"] == "train"]
    (sweep,) = [r for r in records if r["kind"] == "scaling"]
    assert sorted(r["world_size"] for r in runs) == [1, 2] and {r["tag"] for r in runs} == {sweep["tag"]}
    assert len({r["config_hash"] for r in runs}) == 1  # the same configuration at both sizes
    rows = sweep["rows"]
    assert [row["processes"] for row in rows] == [1, 2]
    one, two = rows
    assert one["efficiency"] == pytest.approx(1.0) and one["speedup"] == pytest.approx(1.0)
    assert two["images_per_s"] == pytest.approx(next(r for r in runs if r["world_size"] == 2)["images_per_s"])
    assert two["efficiency"] == pytest.approx(two["images_per_s_per_gpu"] / one["images_per_s_per_gpu"])
    assert next(r for r in runs if r["world_size"] == 2)["global_batch"] == 4
    table = result.output
    assert "scaling: ssl test_resnet 64px" in table and "efficiency" in table
    assert f"{two['images_per_s']:.1f}" in table and "1.00x" in table
