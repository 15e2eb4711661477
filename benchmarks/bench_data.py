"""Data loading throughput: shard streaming vs a folder DataLoader vs raw decode, in one run.

    python benchmarks/bench_data.py                      # 256 synthetic 256-px tiles, 224-px crops
    python benchmarks/bench_data.py --data ../shared/data/dubai_aerial --classes dubai.yaml \
        --crop 512 --batch 8 --shard-size 16 --out benchmarks/results/bench_data_dubai.json

All three read the same samples with the same number of worker processes:

* ``stream``  - ``distseg.data.stream.build_loader`` (train mode: shuffle, decode, weak augment, batch)
* ``folder``  - a map-style Dataset over the image/mask folders through ``torch.utils.data.DataLoader``
                doing the same decode, class-map encoding, weak augment and batching
* ``decode``  - decode image + mask only, nothing else (the upper bound)

Prints the median samples/s over interleaved repeats and the ratios stream/decode (target >= 0.9)
and stream/folder (target >= 1), and saves JSON under benchmarks/results/. ``--data DIR
[--classes FILE]`` uses an existing images/ + masks/ folder (e.g. large aerial rasters) instead of
generating small synthetic scenes; the Dubai class map is in docs/data.md.

Small tiles are the hard case for the decode ratio: decoding a 256-px JPEG costs about as much as
the bilinear rescale of the 224-px crop, so augmentation alone costs ~half the upper bound there.
On large rasters decode dominates and the stream (which also reads pre-encoded index masks instead
of RGB colour masks) matches or beats the decode-only bound.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from distseg.data.augment import AugmentConfig, brightness_factors, to_float, weak_geometric
from distseg.data.classes import ClassMap
from distseg.data.imageio import decode_image, list_images, load_mask
from distseg.data.shard import shard_dataset
from distseg.data.stream import StreamConfig, build_loader
from distseg.data.synthetic import write_dataset

RESULTS = Path(__file__).resolve().parent / "results"


class FolderDataset(Dataset):
    """The conventional baseline: one file pair per item, decoded and augmented in the worker."""

    def __init__(self, root: Path, classes: Path, aug: AugmentConfig) -> None:
        self.images = list_images(root / "images", "image")
        self.masks = list_images(root / "masks", "mask")
        self.keys = sorted(self.images)
        self.class_map = ClassMap.from_file(classes)
        self.rgb = any(e.color is not None for e in self.class_map.entries)
        self.aug = aug

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        key = self.keys[i]
        image = decode_image(self.images[key].read_bytes())
        mask = self.class_map.encode(load_mask(self.masks[key], self.rgb), self.masks[key])
        rng = np.random.default_rng(i)
        image, mask = weak_geometric(image, mask, self.aug, rng, self.class_map.ignore_index)
        return image, mask


class DecodeOnly(IterableDataset):
    """The upper bound: each worker decodes its share of the image/mask files and reports one count
    per batch, so neither augmentation nor batch transfer is paid."""

    def __init__(self, folder: FolderDataset, batch: int) -> None:
        self.folder, self.batch = folder, batch

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        count = 0
        for key in self.folder.keys[wid::n]:
            decode_image(self.folder.images[key].read_bytes())
            load_mask(self.folder.masks[key], self.folder.rgb)
            count += 1
            if count == self.batch:
                yield count
                count = 0
        if count:
            yield count


def folder_collate(items, aug: AugmentConfig):
    """Stack crops into the same float [0, 1] batch layout the stream yields."""
    factors = brightness_factors(len(items), aug.brightness, torch.Generator().manual_seed(0))
    images = torch.from_numpy(np.stack([i for i, _ in items]))
    return {"image": to_float(images, factors), "mask": torch.from_numpy(np.stack([m for _, m in items])).long()}


def timed(loader, samples_of) -> tuple[float, int]:
    """Wall time and sample count of one full pass (worker start-up included: it is part of an epoch)."""
    start, n = time.perf_counter(), 0
    for item in loader:
        n += samples_of(item)
    return time.perf_counter() - start, n


def loaders(args: argparse.Namespace, root: Path, classes: Path, shards: Path) -> dict[str, tuple]:
    """The three pipelines over the same samples and workers, with a samples-per-item counter each."""
    aug = AugmentConfig(crop_size=args.crop)
    cfg = StreamConfig(batch_size=args.batch, num_workers=args.workers, shuffle_buffer=64, augment=aug)
    folder = FolderDataset(root, classes, aug)
    keep = args.workers > 0  # persistent workers everywhere: the stream keeps its workers across epochs too
    return {
        "decode": (DataLoader(DecodeOnly(folder, args.batch), batch_size=None, num_workers=args.workers,
                              persistent_workers=keep), lambda n: n),
        "folder": (DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                              collate_fn=lambda items: folder_collate(items, aug), persistent_workers=keep),
                   lambda b: len(b.mask)),
        "stream": (build_loader(shards, "train", cfg), lambda b: len(b.key)),
    }


def _names_only(args: argparse.Namespace) -> dict[str, str]:
    """Paths reduced to their last component, so results never record a machine's folder layout."""
    return {k: Path(v).name for k in ("data", "classes", "out") if (v := getattr(args, k))}


def run(args: argparse.Namespace) -> dict:
    """Shard the data, then time the three pipelines in interleaved repeats; median per pipeline."""
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        root = Path(args.data) if args.data else write_dataset(tmp / "src", args.images, args.size, seed=0,
                                                               image_format="jpg")
        classes = Path(args.classes) if args.classes else root / "classes.yaml"
        shard_dataset(tmp / "shards", images=root / "images", masks=root / "masks", classes=classes,
                      split="1:0:0", shard_size=args.shard_size)
        pipelines = loaders(args, root, classes, tmp / "shards")
        runs: dict[str, list[float]] = {name: [] for name in pipelines}
        for rep in range(args.repeats):  # interleaved, so drifting machine load hits all three alike
            pipelines["stream"][0].set_epoch(rep)
            for name, (loader, count) in pipelines.items():
                seconds, n = timed(loader, count)
                runs[name].append(n / seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    typical = {k: statistics.median(v) for k, v in runs.items()}  # robust to load spikes on shared machines
    return {"samples_per_s": typical, "all_runs": runs, "stream_over_decode": typical["stream"] / typical["decode"],
            "stream_over_folder": typical["stream"] / typical["folder"],
            "settings": {**vars(args), **_names_only(args), "samples": n, "cpu_count": os.cpu_count(), "torch": torch.__version__}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="folder with images/ and masks/ (default: synthetic scenes)")
    parser.add_argument("--classes", help="class map for --data (default: DATA/classes.yaml)")
    parser.add_argument("--images", type=int, default=256, help="synthetic images to generate")
    parser.add_argument("--size", type=int, default=256, help="synthetic image side in pixels")
    parser.add_argument("--crop", type=int, default=224, help="training crop size")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", default="64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "bench_data.json"))
    args = parser.parse_args()
    result = run(args)
    for name, value in result["samples_per_s"].items():
        print(f"{name:>7}: {value:8.1f} samples/s")
    print(f"stream / decode = {result['stream_over_decode']:.2f}  (target >= 0.9)")
    print(f"stream / folder = {result['stream_over_folder']:.2f}  (target >= 1.0)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
