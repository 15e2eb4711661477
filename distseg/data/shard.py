"""``distseg shard-data``: validate, tile, split and write image/mask folders as WebDataset shards.

Planning reads only file headers (sizes, tile grids, splits, the labelled subset); writing then
decodes each source once and sends its tiles to the writer of their split. Everything happens in a
hidden temporary folder that is renamed to OUT only on success.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from distseg.data.classes import ClassMap, Unknown
from distseg.data.errors import DataError
from distseg.data.imageio import encode_png, image_size, list_images, load_image, load_mask
from distseg.data.manifest import FORMAT, MANIFEST, read_manifest, write_manifest
from distseg.data.options import ShardOptions
from distseg.data.splitting import (assign_splits, group_of, labeled_subset, parse_assign, parse_ratio, stable_hash,
                                    strip_extent, strip_splits)
from distseg.data.tiling import crop_padded, is_whole, tile_grid
from distseg.data.writer import ShardLimit, SplitWriter, parse_shard_size
from distseg.folders import check_replaceable

__all__ = ["shard_dataset", "read_manifest", "DataError", "ShardOptions"]


@dataclasses.dataclass
class Source:
    """One input image (and its mask when labelled) with its planned crops."""

    image: Path
    mask: Path | None
    group: str
    width: int = 0
    height: int = 0
    split: str = "unlabeled"
    crops: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    keys: list[str] = dataclasses.field(default_factory=list)


def _sample_key(stem: str, crop: tuple[int, int, int, int], tiled: bool) -> str:
    """A WebDataset-safe key (no dots: they separate the key from the extension)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
    return f"{base}_x{crop[0]}_y{crop[1]}" if tiled else base


def _included(folder: Path, what: str, include: re.Pattern[str] | None) -> dict[str, Path]:
    """The image files of ``folder`` by stem whose name matches ``include`` (all without it); none is an error."""
    files = list_images(folder, what)
    if include is None:
        return files
    kept = {stem: path for stem, path in files.items() if include.search(path.name)}
    if not kept:
        raise DataError(f"{folder}: no {what} file name matches --include {include.pattern!r}")
    return kept


def _collect(images: Path | None, masks: Path | None, unlabeled: Path | None,
             pattern: re.Pattern[str] | None, include: re.Pattern[str] | None = None) -> list[Source]:
    """Pair images with masks by stem (among the files ``include`` keeps); unpaired images (or masks) are errors,
    not silently dropped."""
    sources: list[Source] = []
    if images is not None:
        found = _included(images, "image", include)
        if masks is not None:
            mask_files = _included(masks, "mask", include)
            for stem, path in found.items():
                if stem not in mask_files:
                    raise DataError(f"{path}: image has no mask in {masks} (masks pair with images by file stem)")
            for stem, path in mask_files.items():
                if stem not in found:
                    raise DataError(f"{path}: mask has no image in {images}")
        for stem, path in found.items():
            if masks is None:  # unlabelled images are not split, so --group-by does not apply to them
                sources.append(Source(path, None, group_of(path.name, None)))
            else:
                sources.append(Source(path, mask_files[stem], group_of(path.name, pattern)))
    if unlabeled is not None:
        sources += [Source(p, None, group_of(p.name, None))
                    for p in _included(unlabeled, "unlabeled", include).values()]
    return sources


def _plan(sources: list[Source], tile: int | None, overlap: int, ratios: dict[str, float], seed: int,
          pinned: dict[str, str], max_pixels: int, strips: re.Pattern[str] | None = None) -> None:
    """Fill in sizes, crops, keys and the split of every labelled source (by group, or by spatial strip with
    ``strips``), from file headers only."""
    seen: dict[str, Path] = {}
    for src in sources:
        src.width, src.height = image_size(src.image, max_pixels)
        if src.mask is not None and image_size(src.mask, max_pixels) != (src.width, src.height):
            mw, mh = image_size(src.mask, max_pixels)
            raise DataError(f"{src.mask}: mask size {mw}x{mh} differs from its image {src.image.name} "
                            f"({src.width}x{src.height})")
        src.crops = tile_grid(src.width, src.height, tile, overlap)
        src.keys = [_sample_key(src.image.stem, c, tile is not None) for c in src.crops]
        for key in src.keys:
            if seen.setdefault(key, src.image) != src.image:
                raise DataError(f"{src.image}: sample key {key!r} collides with {seen[key]} (rename one file)")
    labelled = [s for s in sources if s.mask is not None]
    if strips is not None:
        by_name = strip_splits({s.image.name: strip_extent(s.image.name, strips) for s in labelled}, ratios)
        for src in labelled:
            src.split = by_name[src.image.name]
        return
    by_group = assign_splits([s.group for s in labelled], ratios, seed, pinned)
    for src in labelled:
        src.split = by_group[src.group]


def _tile_splits(sources: list[Source], labeled_fraction: float, seed: int) -> dict[str, str]:
    """Split of every sample key: the source's split, except train tiles outside the labelled subset."""
    train_keys = [k for s in sources if s.split == "train" for k in s.keys]
    kept = labeled_subset(train_keys, labeled_fraction, seed)
    return {k: ("unlabeled" if s.split == "train" and k not in kept else s.split) for s in sources for k in s.keys}


def _samples(src: Source, splits: dict[str, str], class_map: ClassMap | None, unknown: Unknown,
             max_pixels: int) -> Iterator[tuple[str, dict[str, Any], np.ndarray | None]]:
    """Decode one source once and yield (split, webdataset sample, index mask or None) per crop."""
    pixels, raw, ext = load_image(src.image, max_pixels)
    index = None
    if src.mask is not None and class_map is not None:
        has_colors = any(e.color is not None for e in class_map.entries)
        index = class_map.encode(load_mask(src.mask, rgb=has_colors, max_pixels=max_pixels), src.mask, unknown)
    order = sorted(range(len(src.crops)), key=lambda i: stable_hash("tile", src.keys[i]))
    for i in order:
        crop, key = src.crops[i], src.keys[i]
        split = splits[key]
        sample: dict[str, Any] = {"__key__": key}
        if ext is not None and is_whole(src.width, src.height, crop):
            sample[ext] = raw
        else:
            sample["png"] = encode_png(crop_padded(pixels, *crop, fill=0))
        tile_mask = None
        if index is not None and split != "unlabeled":
            tile_mask = crop_padded(index, *crop, fill=class_map.ignore_index)
            sample["mask.png"] = encode_png(tile_mask, level=6)  # masks shrink a lot and decode faster
        meta = {"source": src.image.name, "mask": src.mask.name if src.mask else None, "group": src.group,
                "offset": [crop[0], crop[1]], "size": [crop[2], crop[3]], "original_size": [src.width, src.height]}
        sample["json"] = json.dumps(meta, separators=(",", ":")).encode()
        yield split, sample, tile_mask


def _prepare_out(out: Path, force: bool) -> Path:
    """Refuse a non-empty OUT without --force (and, with it, one that is not a shard folder); return the temporary
    sibling folder to write into, after removing those left by killed runs."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DataError(f"{out}: folder is not empty (use --force to replace it)")
        check_replaceable(out, MANIFEST, "shard folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _remove_stale_partials(out: Path) -> None:
    """Delete ``.OUT.partial-PID`` folders whose process is gone (a shard-data that was killed mid-write)."""
    from distseg.supervise import alive

    for tmp in out.parent.glob(f".{out.name}.partial-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _progress(enabled: bool, total: int) -> Any:
    """A rich progress bar over sources, or a no-op context when disabled (tests, library use)."""
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("sharding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


def shard_dataset(out: str | Path, *, force: bool = False, command: list[str] | None = None, progress: bool = False,
                  **options: Any) -> dict[str, Any]:
    """Write ``OUT/<split>-NNNNNN.tar`` shards and ``OUT/manifest.json``; returns the manifest.

    ``options`` are the fields of :class:`~distseg.data.options.ShardOptions`: ``images`` + ``masks`` are labelled
    data split ``split`` (train:val:test) by source image or by ``group_by`` group, with ``assign`` pinning groups
    to splits, or west to east by ``strip_by``; ``include`` keeps only the files whose name matches; only ``labeled_fraction`` of the train tiles keep labels, the rest (and ``images`` without
    ``masks``, and ``unlabeled``) form the 'unlabeled' split. Raises DataError on bad input.
    """
    out = Path(out)
    try:
        opts = ShardOptions(**options)
    except TypeError as exc:
        raise DataError(f"shard options: {exc}") from None
    ratios, limit, pinned = parse_ratio(opts.split), parse_shard_size(opts.shard_size), parse_assign(opts.assign)
    if opts.images is None and opts.unlabeled is None:
        raise DataError("nothing to shard: give --images (with --masks for labelled data) and/or --unlabeled")
    class_map = ClassMap.from_file(opts.classes) if opts.classes is not None else None
    sources = _collect(*(Path(v) if v else None for v in (opts.images, opts.masks, opts.unlabeled)), opts.pattern(),
                       opts.include_pattern())
    _plan(sources, opts.tile, opts.overlap, ratios, opts.seed, pinned, opts.max_pixels, opts.strip_pattern())
    splits = _tile_splits(sources, opts.labeled_fraction, opts.seed)
    tmp = _prepare_out(out, force)
    try:
        stats = _write_all(tmp, sources, splits, class_map, opts, limit, progress)
        manifest = _manifest(stats, class_map, command or opts.command(out), opts.layout())
        write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_all(tmp: Path, sources: list[Source], splits: dict[str, str], class_map: ClassMap | None,
               opts: ShardOptions, limit: ShardLimit, progress: bool) -> dict[str, SplitWriter]:
    """Decode sources in a seeded order (so shards mix scenes) and stream their tiles to split writers."""
    writers: dict[str, SplitWriter] = {}
    num_classes = class_map.num_classes if class_map else 0
    ordered = sorted(sources, key=lambda s: (stable_hash(opts.seed, "order", s.image.name), s.image.name))
    try:
        with _progress(progress, len(ordered)) as bar:
            task = bar.add_task("sharding", total=len(ordered)) if bar else None
            for src in ordered:
                for name, sample, mask in _samples(src, splits, class_map, opts.unknown, opts.max_pixels):
                    if name not in writers:
                        writers[name] = SplitWriter(tmp, name, limit, num_classes)
                    writers[name].write(sample, mask, src.image.name)
                if bar:
                    bar.advance(task)
    finally:  # also on errors: an unclosed tar stream would write into the removed folder later
        for writer in writers.values():
            writer.close()
    return writers


def _manifest(writers: dict[str, SplitWriter], class_map: ClassMap | None, command: list[str] | None,
              options: dict[str, Any]) -> dict[str, Any]:
    """Assemble manifest.json: class map, per-split counts and class pixels, per-shard counts and sha256."""
    from distseg import __version__

    order = ["train", "val", "test", "unlabeled"]
    splits, shards = {}, []
    for name in sorted(writers, key=order.index):
        w = writers[name]
        info: dict[str, Any] = {"samples": w.samples, "sources": len(w.sources)}
        if name != "unlabeled" and class_map is not None:
            info["class_pixels"] = {c: int(n) for c, n in zip(class_map.names, w.class_pixels)}
            info["ignore_pixels"] = int(w.ignore_pixels)
        splits[name] = info
        shards += w.shards
    return {"format": FORMAT, "version": __version__, "command": list(command or []),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "class_map": class_map.to_dict() if class_map else None, "options": options,
            "splits": splits, "shards": shards}
