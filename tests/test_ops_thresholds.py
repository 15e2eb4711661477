"""Class-adaptive thresholds: the running per-class confidence against a plain loop, and its edge cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distseg.ops.thresholds import ClassThresholds


def _probs(seed: int, b: int = 2, c: int = 4, size: int = 6) -> torch.Tensor:
    return F.softmax(torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2, dim=1)


def _class_means(probs: torch.Tensor) -> dict[int, float]:
    """Mean max-probability of the pixels whose argmax is c, pixel by pixel."""
    totals: dict[int, list[float]] = {}
    for b in range(probs.shape[0]):
        for i in range(probs.shape[2]):
            for j in range(probs.shape[3]):
                v = probs[b, :, i, j]
                totals.setdefault(int(v.argmax()), []).append(float(v.max()))
    return {c: sum(vals) / len(vals) for c, vals in totals.items()}


def test_the_running_confidence_matches_a_loop_and_sets_the_thresholds():
    th = ClassThresholds(4, tau=0.9, momentum=0.8)
    assert torch.equal(th.thresholds(), torch.full((4,), 0.9)), "before any batch: the plain tau"
    first, second = _probs(0), _probs(1)
    second[:, 3] = 0.0  # class 3 is absent from the second batch
    expected = [1.0] * 4
    seen = [False] * 4
    for batch in (first, second):
        th.update(batch)
        for c, mean in _class_means(batch).items():
            expected[c] = 0.8 * expected[c] + 0.2 * mean if seen[c] else mean
            seen[c] = True
        torch.testing.assert_close(th.sigma, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert seen[3] and th.sigma[3] == pytest.approx(_class_means(first)[3], rel=1e-5), "an absent class keeps σ"
    torch.testing.assert_close(th.thresholds(), 0.9 * th.sigma / th.sigma.max())
    assert th.thresholds().max() == pytest.approx(0.9) and (th.thresholds() < 0.9).any()


def test_a_nonfinite_batch_leaves_the_state_alone_and_state_round_trips():
    th = ClassThresholds(4, tau=0.8)
    th.update(_probs(0))
    before = th.state_dict()
    bad = _probs(1)
    bad[0, :, 0, 0] = float("nan")
    th.update(torch.full_like(bad, float("nan")))
    assert torch.equal(th.sigma, before["sigma"]) and th.sigma.isfinite().all()
    th.update(bad)  # one NaN pixel poisons the sums of the class it lands in, never the others
    assert th.sigma.isfinite().all()
    again = ClassThresholds(4, tau=0.8)
    again.load_state_dict(th.state_dict())
    assert torch.equal(again.sigma, th.sigma) and torch.equal(again.seen, th.seen)
    with pytest.raises(ValueError, match="for 4 classes, expected 3"):
        ClassThresholds(3, tau=0.8).load_state_dict(th.state_dict())
    with pytest.raises(ValueError, match="tau"):
        ClassThresholds(3, tau=1.2)


_TWO_RANKS = r"""
import json, os, sys, torch
import torch.nn.functional as F
from distseg.engine.distributed import init_distributed
from distseg.ops.thresholds import ClassThresholds

env = init_distributed(device="cpu")
probs = [F.softmax(torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(r)) * 2, 1) for r in range(2)]
th = ClassThresholds(4, tau=0.9)
th.update(probs[env.rank])  # each rank sees only its own batch
alone = ClassThresholds(4, tau=0.9)
alone.update(torch.cat(probs))  # one process seeing both batches
assert torch.allclose(th.sigma, alone.sigma, rtol=1e-5, atol=1e-6), (th.sigma, alone.sigma)
with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
    json.dump(th.sigma.tolist(), f)
"""


@pytest.mark.slow
def test_two_ranks_hold_the_thresholds_of_their_combined_batches(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO, stage_env

    script = tmp_path / "two.py"
    script.write_text(_TWO_RANKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29100 + os.getpid() % 100), str(script), str(tmp_path)],
                          capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sigmas = [(tmp_path / f"rank{r}.json").read_text() for r in (0, 1)]
    assert sigmas[0] == sigmas[1], "the replicas' thresholds differ"
