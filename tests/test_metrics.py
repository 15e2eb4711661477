"""Confusion-matrix metrics against a naive numpy reference, and a 2-process gloo all-reduce."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distseg.engine.metrics import ConfusionMatrix, format_markdown, format_table


def _numpy_reference(preds, targets, num_classes: int, ignore: int = 255) -> dict:
    """Pixel loop over all batches: IoU per class (None when absent from both), mIoU, accuracy."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, target in zip(preds, targets):
        for p, t in zip(pred.numpy().ravel(), target.numpy().ravel()):
            if t != ignore:
                conf[t, p] += 1
    ious = []
    for c in range(num_classes):
        tp, fp, fn = conf[c, c], conf[:, c].sum() - conf[c, c], conf[c, :].sum() - conf[c, c]
        ious.append(None if tp + fp + fn == 0 else tp / (tp + fp + fn))
    present = [v for v in ious if v is not None]
    return {"conf": conf, "ious": ious, "miou": float(np.mean(present)), "acc": np.trace(conf) / conf.sum()}


def _batches(seed: int, n: int = 3, num_classes: int = 5, absent: tuple[int, ...] = (3,)):
    """Random predictions/targets that never use the ``absent`` classes; some target pixels ignored."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor([c for c in range(num_classes) if c not in absent])
    preds = [used[torch.randint(0, len(used), (2, 6, 7), generator=g)] for _ in range(n)]
    targets = [used[torch.randint(0, len(used), (2, 6, 7), generator=g)] for _ in range(n)]
    for t in targets:
        t[torch.rand(t.shape, generator=g) < 0.2] = 255
    return preds, targets


def _assert_matches(result: dict, ref: dict) -> None:
    assert result["confusion"] == ref["conf"].tolist()
    for got, want in zip(result["per_class_iou"], ref["ious"]):
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want)
    assert result["miou"] == pytest.approx(ref["miou"])
    assert result["pixel_acc"] == pytest.approx(ref["acc"])


def test_matches_numpy_reference_with_na_class():
    preds, targets = _batches(0)
    cm = ConfusionMatrix(5)
    for p, t in zip(preds, targets):
        cm.update(p, t)
    result = cm.compute()
    assert result["per_class_iou"][3] is None
    _assert_matches(result, _numpy_reference(preds, targets, 5))
    json.dumps(result)  # plain Python values only


def test_class_only_predicted_scores_zero_not_na():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    pred = torch.tensor([[[0, 1], [0, 0]]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.compute()["per_class_iou"] == [0.75, 0.0, None]


def test_logits_input_reset_and_empty():
    preds, targets = _batches(1, n=1)
    logits = torch.nn.functional.one_hot(preds[0], 5).permute(0, 3, 1, 2).float()
    cm = ConfusionMatrix(5)
    cm.update(logits, targets[0])
    _assert_matches(cm.compute(), _numpy_reference(preds, targets, 5))
    cm.reset()
    empty = cm.compute()
    assert empty["miou"] is None and empty["pixel_acc"] is None and empty["per_class_iou"] == [None] * 5
    with pytest.raises(ValueError, match="shape"):
        cm.update(preds[0][:, :3], targets[0])


def test_out_of_range_targets_not_counted():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.tensor([[0, 1, 1, 0]]), torch.tensor([[0, 7, 255, -1]]))
    assert cm.compute()["confusion"] == [[1, 0], [0, 0]]


def test_tables_show_na_and_percentages():
    preds, targets = _batches(2)
    cm = ConfusionMatrix(5)
    for p, t in zip(preds, targets):
        cm.update(p, t)
    result = cm.compute()
    names = ["bkg", "road", "farm", "bldg", "water"]
    md = format_markdown(result, names)
    assert "| bldg | n/a |" in md and f"| mIoU | {100 * result['miou']:.2f} |" in md
    table = format_table(result, names)
    assert table.row_count == 7 and list(table.columns[0].cells)[3] == "bldg"
    with pytest.raises(ValueError, match="class names"):
        format_markdown(result, names[:2])


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        preds, targets = _batches(10 + rank)
        cm = ConfusionMatrix(5)
        for p, t in zip(preds, targets):
            cm.update(p, t)
        result = cm.all_reduce().compute()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_process_gloo(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    preds, targets = [], []
    for rank in range(2):
        p, t = _batches(10 + rank)
        preds += p
        targets += t
    _assert_matches(results[0], _numpy_reference(preds, targets, 5))
