"""The mean-teacher stage's targets and BN handling, and that it improves its start model on the synthetic target domain in a short CPU run.

Set-up (see docs/ssl_findings.md for the measurements behind the numbers): 40 synthetic target-domain scenes split
6:2:2 by image with a third of the train tiles labelled (8 labelled, 8 val, 56 unlabelled). The start model is
plain supervised training of the tiny model from its initial weights; the SSL stage then runs 80 steps from it with
a strong view suited to colour-defined classes (no grayscale, milder colour jitter: the default strong view removes
the colour evidence these classes are told apart by, and makes the consistency loss hurt).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import launch, tiny_stage_config

START_STEPS = 30
SSL_STEPS = 80
MIN_GAIN = 0.04
"""Teacher val mIoU gain over the start model that the test demands. Measured gains in this set-up: +0.066, +0.082,
+0.082 (three seeds, seed-to-seed spread about 0.01); see docs/ssl_findings.md."""
MILD_STRONG_VIEW = ("data.stream.augment.grayscale_prob=0", "data.stream.augment.jitter_saturation=0.1",
                    "data.stream.augment.jitter_brightness=0.2", "data.stream.augment.jitter_contrast=0.2")


def test_running_stats_frozen_keeps_statistics_but_normalises_by_batch():
    from distseg.stages.ssl import running_stats_frozen

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=None).train()
    bn.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    with running_stats_frozen(bn):
        y = bn(x)
    assert bn.momentum is None
    for key, value in before.items():
        assert torch.equal(bn.state_dict()[key], value), key
    torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True))
    bn(x)  # outside the context the running statistics move again
    assert not torch.equal(bn.running_mean, before["running_mean"])


def test_cutmix_plan_is_applied_to_pseudo_labels_keep_and_teacher_probs():
    """A per-pixel teacher on the mixed image must give exactly the mixed targets of the unmixed image."""
    from distseg.data.augment import apply_cutmix, cutmix_boxes
    from distseg.data.batch import Batch
    from distseg.ops.pseudo import pseudo_label, tta_probs
    from distseg.stages.ssl import SSLOptions, SSLTask

    torch.manual_seed(0)
    teacher = nn.Conv2d(3, 4, 1).eval()  # per-pixel, so predicting on a mixed image = mixing the predictions
    with torch.no_grad():
        teacher.weight.mul_(8)  # confident on some pixels, unsure on others
    weak = torch.rand(4, 3, 16, 16)
    box, index = cutmix_boxes(4, 16, 16, 1.0, torch.Generator().manual_seed(1))
    strong = apply_cutmix(weak, box, index)
    opts = SSLOptions(tau=0.6, consistency="kl", tta=("identity",))
    fake = SimpleNamespace(options=opts, autocast=contextlib.nullcontext(), class_map=SimpleNamespace(ignore_index=255),
                           teacher=teacher, thresholds=None, sources=["pool_a", "pool_b"])
    fake.source_of = lambda batch: SSLTask.source_of(fake, batch)
    source = torch.tensor([0, 1, 1, 0])
    unl = Batch(key=list("abcd"), image=weak, image_strong=strong, cutmix_box=box, cutmix_index=index, source=source)
    targets = SSLTask.pseudo_targets(fake, unl)
    assert torch.equal(targets.weak_source, source[:, None, None].expand(4, 16, 16))
    assert torch.equal(targets.source, apply_cutmix(targets.weak_source, box, index))
    out_strong, labels, keep, soft = targets.strong, targets.labels, targets.keep, targets.soft
    expected_probs = tta_probs(teacher, strong, ("identity",))
    expected = pseudo_label(expected_probs, tau=0.6, from_logits=False, compile=False)
    unmixed = pseudo_label(tta_probs(teacher, weak, ("identity",)), tau=0.6, from_logits=False, compile=False)
    assert not torch.equal(unmixed.labels, expected.labels) and 0 < keep.float().mean() < 1  # the check can fail
    assert torch.equal(out_strong, strong)
    assert torch.equal(labels, expected.labels) and torch.equal(keep, expected.keep)
    torch.testing.assert_close(soft, expected_probs)


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
    ssl_sets = ("optim.lr=0.01", "train.eval_every=20", "ssl.tau=0.95", "ssl.ema.warmup_steps=1000", *MILD_STRONG_VIEW)
    launch("ssl.py", "--config", cfg, "--data", str(data), "--init", str(start), "--out", str(ssl),
           "--steps", str(SSL_STEPS), *(arg for s in ssl_sets for arg in ("--set", s)))
    before = _record(start)["metrics"]["student"]["miou"]
    after = _record(ssl)["metrics"]["teacher"]["miou"]
    assert after >= before + MIN_GAIN, f"SSL teacher mIoU {after:.3f} vs start {before:.3f}"
