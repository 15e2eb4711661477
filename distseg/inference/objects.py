"""Object-level scores: how many objects (buildings) a prediction found, missed and invented.

A pixel IoU says little about how many buildings a mapper gets. Here, as in SpaceNet's building F1, every
4-connected region of the chosen class is one object, in the prediction and in the ground truth. A
predicted object *finds* a true object when their IoU is at least a threshold (0.5). Pairs are matched
one to one, highest IoU first (at a threshold of 0.5 or more an object can overlap that much with one
object only, so the order changes nothing there). Then:

- precision = found / predicted objects, recall = found / true objects, F1 = their harmonic mean;
- pixel IoU of the class is given beside them.

Pixels the ground truth ignores (``ignore_index``) are removed from the prediction first, so an object
that only exists where there is no label is not counted against the model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distseg.inference.errors import PredictError

MASK_SUFFIXES = (".png", ".tif", ".tiff")
"""Ground-truth mask files looked up for an input, by its stem."""


def objects(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected regions of a boolean mask: (int32 ids, 0 outside, 1..n inside), n)."""
    from scipy import ndimage

    from distseg.inference.polygonize import FOUR_CONNECTED

    ids, count = ndimage.label(mask, structure=FOUR_CONNECTED)
    return ids.astype(np.int32, copy=False), int(count)


def match_objects(pred: np.ndarray, true: np.ndarray, iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """(found, predicted, true) object counts of two boolean masks of one class."""
    pred_ids, n_pred = objects(pred)
    true_ids, n_true = objects(true)
    if n_pred == 0 or n_true == 0:
        return 0, n_pred, n_true
    pred_size = np.bincount(pred_ids.ravel(), minlength=n_pred + 1)
    true_size = np.bincount(true_ids.ravel(), minlength=n_true + 1)
    both = (pred_ids > 0) & (true_ids > 0)
    pairs, overlap = np.unique(pred_ids[both].astype(np.int64) * (n_true + 1) + true_ids[both], return_counts=True)
    p, t = pairs // (n_true + 1), pairs % (n_true + 1)
    iou = overlap / (pred_size[p] + true_size[t] - overlap)
    used_p, used_t, found = set(), set(), 0
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < iou_threshold:
            break
        if p[k] not in used_p and t[k] not in used_t:
            used_p.add(p[k])
            used_t.add(t[k])
            found += 1
    return found, n_pred, n_true


@dataclasses.dataclass
class ObjectScore:
    """Object and pixel counts of one class, added up over images."""

    class_name: str
    """The class whose objects are counted."""
    iou_threshold: float = 0.5
    """A predicted object matches a true one (one to one) when their IoU is at least this."""
    found: int = 0
    """True objects matched by a predicted one."""
    predicted: int = 0
    """Predicted objects."""
    true: int = 0
    """True objects."""
    intersection: int = 0
    """Pixels of the class in both prediction and truth (for pixel IoU)."""
    union: int = 0
    """Pixels of the class in either."""

    def add(self, pred_labels: np.ndarray, true_labels: np.ndarray, class_index: int, ignore_index: int) -> None:
        """Count one image: index masks of the same size (ignored truth pixels are left out of both)."""
        keep = true_labels != ignore_index
        pred = (pred_labels == class_index) & keep
        true = (true_labels == class_index) & keep
        found, n_pred, n_true = match_objects(pred, true, self.iou_threshold)
        self.found += found
        self.predicted += n_pred
        self.true += n_true
        self.intersection += int((pred & true).sum())
        self.union += int((pred | true).sum())

    @classmethod
    def total(cls, summaries: Sequence[dict[str, Any]]) -> ObjectScore:
        """The counts of several :meth:`summary` results added up."""
        first = summaries[0]
        return cls(first["class"], first["iou_threshold"],
                   *(sum(s[k] for s in summaries) for k in ("found", "predicted_objects", "true_objects",
                                                            "intersection_pixels", "union_pixels")))

    def summary(self) -> dict[str, Any]:
        """Counts, precision, recall, F1 (None when undefined: no predicted / true objects) and pixel IoU."""
        precision = self.found / self.predicted if self.predicted else None
        recall = self.found / self.true if self.true else None
        f1 = (2 * self.found / (self.predicted + self.true)) if self.predicted + self.true else None
        return {"class": self.class_name, "iou_threshold": self.iou_threshold, "found": self.found,
                "missed": self.true - self.found, "false": self.predicted - self.found,
                "predicted_objects": self.predicted, "true_objects": self.true, "precision": precision,
                "recall": recall, "f1": f1, "pixel_iou": self.intersection / self.union if self.union else None,
                "intersection_pixels": self.intersection, "union_pixels": self.union}


@dataclasses.dataclass
class ObjectsConfig:
    """``--truth DIR --objects CLASS``: score the predictions against ground-truth masks."""

    truth: Path
    """Folder of ground-truth masks named like the inputs (``<stem>.png`` or ``.tif``), coded as the class map."""
    class_name: str
    """Class whose objects are counted (e.g. building)."""
    iou_threshold: float = 0.5
    """IoU at which a predicted object finds a true one."""

    def __post_init__(self) -> None:
        self.truth = Path(self.truth)
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"the object IoU threshold must be in (0, 1], got {self.iou_threshold}")

    def truth_files(self, inputs: Sequence[Path]) -> dict[Path, Path]:
        """The ground-truth mask of every input; a missing one is a PredictError before any work."""
        if not self.truth.is_dir():
            raise PredictError(f"--truth {self.truth}: no such folder")
        found = {}
        for path in inputs:
            match = [m for m in (self.truth / f"{path.stem}{s}" for s in MASK_SUFFIXES) if m.is_file()]
            if not match:
                raise PredictError(f"{path}: no ground-truth mask {path.stem}.png/.tif in {self.truth}")
            found[path] = match[0]
        return found


def read_prediction(path: Path) -> np.ndarray:
    """A class raster written by ``distseg predict`` (PNG or GeoTIFF of class indices)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import rasterio

        with rasterio.open(path) as src:
            return src.read(1)
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img)


def read_truth(path: Path, class_map: Any) -> np.ndarray:
    """A ground-truth mask (PNG or GeoTIFF, values or colours as the class map codes them) as class indices."""
    from distseg.data.errors import DataError
    from distseg.data.imageio import load_mask

    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import rasterio

            with rasterio.open(path) as src:
                raw = src.read()
            raw = raw[0] if raw.shape[0] == 1 else np.moveaxis(raw[:3], 0, -1)
        else:
            raw = load_mask(path, rgb=any(e.color is not None for e in class_map.entries))
        return class_map.encode(raw, path)
    except DataError as exc:
        raise PredictError(str(exc)) from None


def score_file(pred_path: Path, truth_path: Path, class_map: Any, cfg: ObjectsConfig) -> dict[str, Any]:
    """Object scores of one written class raster against its ground-truth mask (both held in memory)."""
    pred = read_prediction(pred_path)
    true = read_truth(truth_path, class_map)
    if pred.shape != true.shape:
        raise PredictError(f"{truth_path}: mask is {true.shape[1]}×{true.shape[0]} px but the prediction of the "
                           f"input is {pred.shape[1]}×{pred.shape[0]}")
    score = ObjectScore(cfg.class_name, cfg.iou_threshold)
    score.add(pred, true, class_map.names.index(cfg.class_name), class_map.ignore_index)
    return score.summary()


def total_objects(summaries: Sequence[dict[str, Any]], cfg: ObjectsConfig) -> dict[str, Any]:
    """The object scores over every predicted file (counts added up, then the ratios)."""
    total = ObjectScore.total([s["objects"] for s in summaries]).summary()
    return {**total, "files": len(summaries), "truth": str(cfg.truth)}


def objects_path(out_dir: Path, cfg: ObjectsConfig) -> Path:
    """Where the scores over all inputs go."""
    return Path(out_dir) / f"objects_{cfg.class_name}.json"
