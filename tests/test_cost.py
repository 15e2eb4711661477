"""A stage's cost: the process tree's CPU (live and reaped workers), pieces carried across a resume, and the
timings entry the runner keeps."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distseg.engine import checkpoint as ckpt
from distseg.engine.cost import StageCost, process_tree_cpu
from distseg.engine.runlog import process_age
from distseg.pipeline.results import stage_timing

BURN = """
import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
open(sys.argv[2], "w").write("done")
time.sleep(60)
"""


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_workers_cpu_is_counted_while_it_runs_and_once_after_it_is_reaped(tmp_path):
    before = process_tree_cpu()
    done = tmp_path / "done"
    child = subprocess.Popen([sys.executable, "-c", BURN, "0.6", str(done)])
    try:
        _wait_for(done)
        live = process_tree_cpu()
    finally:
        child.kill()
        child.wait()
    reaped = process_tree_cpu()
    assert live - before >= 0.55, "a live child's CPU is part of the tree's (the kernel counts it in 10 ms ticks)"
    assert reaped - live == pytest.approx(0.0, abs=0.15), "reaping moves its time into ours: counted once"


def test_pieces_carry_across_a_resume():
    first = StageCost()
    one = first.snapshot(4)
    assert one["complete"] and [(p["from_step"], p["to_step"]) for p in one["pieces"]] == [(0, 4)]
    assert one["cpu_s"] == one["pieces"][0]["cpu_s"] > 0
    assert 0 < one["wall_s"] <= process_age() + 0.01

    resumed = StageCost()
    resumed.resume_from(json.loads(json.dumps(one)), 4)  # as a checkpoint's client state carries it
    two = resumed.snapshot(10)
    assert [(p["from_step"], p["to_step"]) for p in two["pieces"]] == [(0, 4), (4, 10)]
    assert two["pieces"][0] == one["pieces"][0]
    assert two["cpu_s"] == pytest.approx(sum(p["cpu_s"] for p in two["pieces"]), abs=1e-6)
    assert two["wall_s"] == pytest.approx(sum(p["wall_s"] for p in two["pieces"]), abs=1e-6)
    assert two["complete"]


def test_a_checkpoint_without_a_cost_gives_an_incomplete_one():
    cost = StageCost()
    cost.resume_from(None, 6)
    snap = cost.snapshot(10)
    assert not snap["complete"] and [(p["from_step"], p["to_step"]) for p in snap["pieces"]] == [(6, 10)]


def _stage(folder: Path, cost: dict | None) -> Path:
    folder.mkdir()
    record = {"kind": "ssl", "finished": True, **({"cost": cost} if cost is not None else {})}
    ckpt.write_json_atomic(folder / ckpt.STAGE_JSON, record)
    return folder


@pytest.mark.parametrize("cost,expected", [
    ({"cpu_s": 900.0, "wall_s": 1200.0, "complete": True, "pieces": []}, {"wall": 1200.0, "cpu": 900.0}),
    ({"cpu_s": 300.0, "wall_s": 400.0, "complete": False, "pieces": []}, {"wall": 50.0, "cpu": 40.0}),
    (None, {"wall": 50.0, "cpu": 40.0}),
], ids=["whole-schedule", "incomplete", "older-record"])
def test_timings_take_the_schedule_cost_a_record_knows(tmp_path, cost, expected):
    assert stage_timing(_stage(tmp_path / "stage", cost), seconds=50.0, cpu=40.0) == expected


def test_timings_of_an_evaluation_are_the_runners_measurement(tmp_path):
    (tmp_path / "eval").mkdir()
    assert stage_timing(tmp_path / "eval", seconds=7.0, cpu=6.5) == {"wall": 7.0, "cpu": 6.5}
