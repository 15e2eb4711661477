"""kill -9 in mid-stage, then --resume, on every CPU-capable shipped DeepSpeed config on 1 and 2 ranks: the resumed run
ends with exactly the weights, learning rate and step count of the uninterrupted one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, kill_after_checkpoint, stage_env, stage_record, tiny_stage_config
from distseg.engine.dsconfig import load_ds_config, precision

pytestmark = pytest.mark.slow

STEPS, KILL_AFTER = 12, 3
"""Each run has 12 optimizer steps with a checkpoint after every one; the kill lands after step 3's is complete."""


def cpu_configs() -> dict[str, list[str]]:
    """Every shipped config that runs on CPU, grouped by identical content (``cpu_fp32`` is ``zero0_fp32``), each
    group named by its last name."""
    groups: dict[str, list[str]] = {}
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        cfg = load_ds_config(path)
        if precision(cfg) == "fp16":
            continue  # fp16 loss scaling needs CUDA (refused on CPU, tested in test_ds_configs)
        key = json.dumps(cfg, sort_keys=True)
        groups.setdefault(key, []).append(path.stem)
    return {names[-1]: names for names in groups.values()}


CONFIGS = cpu_configs()
CASES = [(name, world) for world in (1, 2) for name in CONFIGS]


def test_every_cpu_capable_config_is_in_the_matrix():
    covered = {n for names in CONFIGS.values() for n in names}
    shipped = {p.stem for p in (REPO / "ds_configs").glob("*.json")}
    assert covered == {n for n in shipped if not n.endswith("fp16")}
    assert {"zero0_fp32", "zero1_fp32", "zero2_fp32", "zero0_bf16", "zero1_bf16", "zero2_bf16"} <= set(CONFIGS)


def _stage_args(cfg: Path, shards: Path, init: Path, ds: str, out: Path) -> list[str]:
    return ["--config", str(cfg), "--data", str(shards), "--parent", str(init), "--ds_config", f"ds_configs/{ds}.json",
            "--out", str(out)]


def _command(world: int, port: int) -> list[str]:
    if world == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port)]


_STRAIGHT = r"""
import json, sys
from distseg.stages.launcher import make_app
for args in json.loads(sys.argv[1]):
    code = make_app("finetune")(args=args, standalone_mode=False)
    assert code in (None, 0), (args, code)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, target_shards, init_weights):
    """The uninterrupted reference of every case, each world size's runs in one launch (same arithmetic, one
    start-up), then each case's killed run and its resume in processes of their own."""
    tmp = tmp_path_factory.mktemp("matrix")
    cfg = tiny_stage_config(tmp, steps=STEPS, ckpt_every=1, log_every=2, fisher_batches=0)
    script = tmp / "straight.py"
    script.write_text(_STRAIGHT)
    for world in (1, 2):
        batch = [_stage_args(cfg, target_shards, init_weights, ds, tmp / f"straight_{ds}_{world}") for ds in CONFIGS]
        proc = subprocess.run([*_command(world, 29400 + os.getpid() % 500), str(script), json.dumps(batch)],
                              capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, cfg


@pytest.mark.parametrize("ds,world", CASES, ids=[f"{ds}-{world}rank" for ds, world in CASES])
def test_kill_and_resume_matches_the_uninterrupted_run(runs, target_shards, init_weights, ds, world):
    tmp, cfg = runs
    straight, killed = tmp / f"straight_{ds}_{world}", tmp / f"killed_{ds}_{world}"
    args = _stage_args(cfg, target_shards, init_weights, ds, killed)
    base = [*_command(world, 29900 + os.getpid() % 90), "-m", "distseg.stages", "finetune", *args]
    kill_after_checkpoint(base, killed, step=KILL_AFTER)
    resumed = subprocess.run(base + ["--resume"], capture_output=True, text=True, env=stage_env(), cwd=REPO,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    done, reference = stage_record(killed), stage_record(straight)
    assert done["finished"] and done["steps"] == reference["steps"] == STEPS and done["world_size"] == world
    assert done["rank_divergence"] == {"student": 0.0}
    pieces = [(p["from_step"], p["to_step"]) for p in done["cost"]["pieces"]]
    assert pieces == [(0, pieces[0][1]), (pieces[0][1], STEPS)] and pieces[0][1] >= KILL_AFTER, pieces
    a, b = load_file(str(straight / "last" / "model.safetensors")), load_file(str(killed / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff == 0.0, f"resumed weights differ by {diff}"
    logged = [[(m["step"], m["lr"]) for m in map(json.loads, (f / "metrics.jsonl").read_text().splitlines())
               if "lr" in m] for f in (straight, killed)]
    assert logged[1] == logged[0]  # one record per step: lines logged after the checkpoint the kill lost are gone
