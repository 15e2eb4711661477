"""The SSL stage's wiring: the teacher stays outside the optimizer, never gets gradients, and follows the EMA."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, stage_env, tiny_stage_config

pytestmark = pytest.mark.slow

_SCRIPT = r"""
import sys, torch
from distseg.engine.distributed import init_distributed
from distseg.engine.loop import next_batches
from distseg.stages.launcher import build_config
from distseg.stages.registry import get_kind
from distseg.stages.trainer import Trainer

cfg = build_config("ssl", sys.argv[1], {"data.shards": sys.argv[2], "parent": sys.argv[3], "out": sys.argv[4]},
                   ["ssl.ema.alpha=0.9", "ssl.tau=0.0"])
env = init_distributed(device="cpu")
stage = Trainer(get_kind("ssl"), cfg, env)
teacher, student = stage.task.teacher, stage.engine.module
optimised = {id(p) for group in stage.engine.optimizer.param_groups for p in group["params"]}
assert not optimised & {id(p) for p in teacher.parameters()}, "teacher parameters in the optimizer"
assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
for step in range(3):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for _ in range(stage.ds_cfg["gradient_accumulation_steps"]):
        losses = stage.task.step(next_batches(stage.data.streams, env.device))
        stage.engine.backward(losses["loss"])
        stage.engine.step()
    assert all(p.grad is None for p in teacher.parameters()), "teacher received gradients"
    assert losses["kept_fraction"].item() == 1.0  # tau = 0 keeps every pixel
    stage.task.state.after_step(stage.engine.was_step_applied())
    after, now = teacher.state_dict(), student.state_dict()
    for k, v in after.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * now[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(v, now[k]), k
    assert not teacher.training
stage.task.state.after_step(False)  # a skipped (overflowed) step leaves the teacher untouched
assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in after.items())
print("OK")
"""


def test_teacher_is_outside_the_engine_and_follows_the_ema(tmp_path, target_shards, init_weights):
    cfg = tiny_stage_config(tmp_path, steps=3)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(cfg), str(target_shards), str(init_weights),
                           str(tmp_path / "out")], capture_output=True, text=True, env=stage_env(), cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
