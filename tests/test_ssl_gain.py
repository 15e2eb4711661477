"""The mean-teacher stage must improve its start model on the synthetic target domain in a short CPU run.

Set-up (see docs/ssl_findings.md for the measurements behind the numbers): 40 synthetic target-domain scenes split
6:2:2 by image with a third of the train tiles labelled (8 labelled, 8 val, 56 unlabelled). The start model is
plain supervised training of the tiny model from its initial weights; the SSL stage then runs 80 steps from it with
a strong view suited to colour-defined classes (no grayscale, milder colour jitter: the default strong view removes
the colour evidence these classes are told apart by, and makes the consistency loss hurt).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import launch, tiny_stage_config

START_STEPS = 30
SSL_STEPS = 80
MIN_GAIN = 0.04
"""Teacher val mIoU gain over the start model that the test demands. Measured gains in this set-up: +0.066, +0.082,
+0.082 (three seeds, seed-to-seed spread about 0.01); see docs/ssl_findings.md."""
MILD_STRONG_VIEW = ("data.stream.augment.grayscale_prob=0", "data.stream.augment.jitter_saturation=0.1",
                    "data.stream.augment.jitter_brightness=0.2", "data.stream.augment.jitter_contrast=0.2")


def _record(folder: Path) -> dict:
    return json.loads((folder / "stage.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 labelled train / 8 val / 56 unlabelled target-domain tiles."""
    from distseg.data.shard import shard_dataset
    from distseg.data.synthetic import write_dataset

    tmp = tmp_path_factory.mktemp("ssl_gain")
    raw = write_dataset(tmp / "raw", 40, size=(64, 96), domain="target", seed=1, n_unlabeled=40)
    shard_dataset(tmp / "shards", images=raw / "images", masks=raw / "masks", unlabeled=raw / "unlabeled",
                  classes=raw / "classes.yaml", split="6:2:2", labeled_fraction=0.34, seed=1, shard_size=8, force=True)
    return tmp / "shards"


@pytest.mark.slow
def test_ssl_stage_improves_its_start_model(data, init_weights, tmp_path):
    cfg = str(tiny_stage_config(tmp_path, fisher_batches=0, eval_batch_size=8))
    start, ssl = tmp_path / "start", tmp_path / "ssl"
    launch("distill.py", "--config", cfg, "--data", str(data), "--teacher", str(init_weights), "--out", str(start),
           "--steps", str(START_STEPS), "--set", "distill.init_from_teacher=true", "--set", "distill.alpha=0",
           "--set", "distill.ewc_lambda=0")
    ssl_sets = ("optim.lr=0.01", "train.eval_every=20", "ssl.tau=0.95", "ssl.ema_warmup=true", *MILD_STRONG_VIEW)
    launch("ssl.py", "--config", cfg, "--data", str(data), "--init", str(start), "--out", str(ssl),
           "--steps", str(SSL_STEPS), *(arg for s in ssl_sets for arg in ("--set", s)))
    before = _record(start)["metrics"]["student"]["miou"]
    after = _record(ssl)["metrics"]["teacher"]["miou"]
    assert after >= before + MIN_GAIN, f"SSL teacher mIoU {after:.3f} vs start {before:.3f}"
