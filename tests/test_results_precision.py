"""Precision and recall in the results table: from the confusion matrix, shown for a two-class map, all in the CSV."""
from __future__ import annotations

import csv

import pytest

from distseg.pipeline.results import ResultRow, precision_recall, table, write_results


def test_precision_and_recall_from_the_confusion_matrix():
    # rows: truth (background, building); columns: prediction
    precision, recall = precision_recall([[90, 2], [6, 4]])
    assert precision == pytest.approx([90 / 96, 4 / 6]) and recall == pytest.approx([90 / 92, 4 / 10])
    precision, recall = precision_recall([[5, 0], [0, 0]])
    assert precision == [1.0, None] and recall == [1.0, None], "never predicted / absent: undefined, not 0"


def _row(label: str, seed: int, iou: float, p: float, r: float) -> ResultRow:
    return ResultRow(label, f"ft.s{seed}", "test", ["background", "building"], [0.9, iou], (0.9 + iou) / 2, None,
                     40, 0, 1.0, 2.0, 3.0, seed=seed, per_class_precision=[0.95, p], per_class_recall=[0.97, r])


def test_a_two_class_table_shows_the_foreground_precision_and_recall(tmp_path):
    rows = [_row("(a) fine-tune", 0, 0.36, 0.95, 0.37), _row("(a) fine-tune", 1, 0.40, 0.85, 0.45)]
    header, cells = table(rows)
    at = header.index("building precision")
    assert header[at - 1:at + 3] == ["building", "building precision", "building recall", "mIoU"]
    assert cells[0][at - 1:at + 2] == ["38.00", "90.00", "41.00"]
    md, path = write_results(rows, tmp_path, "oam")
    assert "building precision and recall" in md.read_text()
    with open(path) as fh:
        lines = list(csv.DictReader(fh))
    assert [float(line["recall_building"]) for line in lines] == [0.37, 0.45]
    assert float(lines[1]["precision_background"]) == 0.95 and lines[0]["iou_building"] == "0.36"


def test_other_maps_keep_iou_only_in_the_table_and_tolerate_missing_confusion():
    three = ResultRow("a", "s", "test", ["x", "y", "z"], [0.5, 0.4, 0.3], 0.4, None, 1, 0, None, None, None,
                      per_class_precision=[1.0, 0.5, 0.2], per_class_recall=[0.5, 0.5, 0.5])
    assert not any("precision" in h for h in table([three])[0])
    old = ResultRow("b", "s", "test", ["background", "building"], [0.9, 0.3], 0.6, None, 1, 0, None, None, None)
    assert not any("precision" in h for h in table([old])[0]), "eval.json without a confusion matrix"
