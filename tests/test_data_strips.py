"""Spatial strip splits and per-site file selection: web-map extents, leak-free cuts, and sharding a site."""
from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distseg.data.errors import DataError
from distseg.data.options import ShardOptions
from distseg.data.shard import read_manifest, shard_dataset
from distseg.data.splitting import parse_ratio, strip_extent, strip_splits

WEBMAP = r"OAM-(?P<x>\d+)-\d+-(?P<z>\d+)"


def test_extents_put_zoom_levels_on_one_axis():
    pattern = re.compile(WEBMAP)
    assert strip_extent("a_OAM-5-9-3.png", pattern) == (Fraction(5, 8), Fraction(6, 8))
    coarse, fine = strip_extent("a_OAM-2-0-2.png", pattern), strip_extent("a_OAM-9-0-4.png", pattern)
    assert coarse[0] <= fine[0] < fine[1] <= coarse[1], "z4 column 9 lies inside z2 column 2"
    assert strip_extent("t_7.png", re.compile(r"t_(?P<x>\d+)")) == (7, 8), "no z group: zoom 0"
    with pytest.raises(DataError, match=r"b\.png: --strip-by .* does not match"):
        strip_extent("b.png", pattern)


def test_strips_keep_overlapping_tiles_together_and_cut_west_to_east():
    # 10 fine z2 columns, plus one coarse z1 tile covering z2 columns 2 and 3: those three files form one strip
    extents = {f"f{x}": (Fraction(x, 4), Fraction(x + 1, 4)) for x in range(4)}
    extents.update({f"g{x}": (Fraction(x, 4), Fraction(x + 1, 4)) for x in range(4, 10)})
    extents["coarse"] = (Fraction(1, 2), Fraction(1, 1))
    split = strip_splits(extents, parse_ratio("8:2:0"))
    assert {split["f2"], split["f3"], split["coarse"]} == {"train"}
    assert [n for n, s in split.items() if s == "val"] == ["g8", "g9"], "the eastmost 20 % of files"
    assert all(max(extents[n][1] for n, s in split.items() if s == "train")
               <= extents[n][0] for n, s in split.items() if s == "val"), "no train file reaches into val"
    three = strip_splits(extents, parse_ratio("6:2:2"))  # 11 files: 7 / 2 / 2, cut on strip boundaries
    assert {n for n, s in three.items() if s == "train"} == {"f0", "f1", "f2", "f3", "coarse", "g4", "g5"}
    assert [three[f"g{x}"] for x in (6, 7, 8, 9)] == ["val", "val", "test", "test"]
    assert set(strip_splits(extents, parse_ratio("0:0:1")).values()) == {"test"}


@pytest.mark.parametrize("seed", range(6))
def test_random_strip_splits_never_share_ground_and_land_near_their_targets(seed):
    rng = np.random.default_rng(seed)
    extents = {}
    for i in range(int(rng.integers(8, 40))):
        zoom = int(rng.integers(3, 6))
        x = int(rng.integers(0, 2 ** zoom))
        extents[f"t{i}"] = (Fraction(x, 2 ** zoom), Fraction(x + 1, 2 ** zoom))
    ratios = parse_ratio(["8:2:0", "7:2:1", "1:1:1"][seed % 3])
    try:
        split = strip_splits(extents, ratios)
    except DataError as exc:
        assert "too few" in str(exc)
        return
    members = {s: [n for n in split if split[n] == s] for s in ("train", "val", "test")}
    assert {s for s in members if members[s]} == {s for s in members if ratios[s] > 0}
    for west, east in (("train", "val"), ("train", "test"), ("val", "test")):
        if members[west] and members[east]:  # west to east, and no extent of one split overlaps another's
            assert max(extents[n][1] for n in members[west]) <= min(extents[n][0] for n in members[east])
    widest = max(sum(1 for m in extents.values() if m[0] < e[1] and e[0] < m[1]) for e in extents.values())
    assert abs(len(members["train"]) - ratios["train"] * len(extents)) <= widest + 1


def test_too_few_strips_is_one_error_line():
    extents = {"a": (Fraction(0), Fraction(1)), "b": (Fraction(1, 2), Fraction(3, 2))}
    with pytest.raises(DataError, match="form 1 separate strip"):
        strip_splits(extents, parse_ratio("8:2:0"))


def test_options_check_the_new_regexes():
    with pytest.raises(DataError, match=r"needs a named group \(\?P<x>"):
        ShardOptions(images="i", strip_by=r"OAM-(\d+)")
    with pytest.raises(DataError, match="cannot be combined with --group-by"):
        ShardOptions(images="i", strip_by=WEBMAP, group_by="(a)")
    with pytest.raises(DataError, match="--include '\\[': invalid regex"):
        ShardOptions(images="i", include="[")
    assert ShardOptions(images="i", strip_by=WEBMAP, include="^a_").layout()["strip_by"] == WEBMAP


def _write_site(root: Path, site: str, columns: range, zoom: int = 5) -> None:
    """Chips ``<site>_OAM-<x>-<y>-<zoom>`` with index masks (0/1), two rows per column."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for x in columns:
        for y in (0, 1):
            stem = f"{site}_OAM-{x}-{y}-{zoom}"
            Image.fromarray(np.full((16, 16, 3), x % 255, np.uint8)).save(root / "images" / f"{stem}.png")
            mask = np.zeros((16, 16), np.uint8)
            mask[: x % 16] = 1
            Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def test_shard_one_site_by_strips_another_as_test_and_as_unlabelled_imagery(tmp_path):
    _write_site(tmp_path, "north", range(10, 20))
    _write_site(tmp_path, "south", range(3, 6))
    classes = tmp_path / "classes.yaml"
    classes.write_text("classes:\n  - {name: background, value: 0}\n  - {name: building, value: 1}\n")
    folders = {"images": tmp_path / "images", "masks": tmp_path / "masks", "classes": classes}
    labelled = shard_dataset(tmp_path / "north", **folders, include="^north_", strip_by=WEBMAP, split="8:2:0",
                             labeled_fraction=0.5)
    assert {k: v["samples"] for k, v in labelled["splits"].items()} == {"train": 8, "val": 4, "unlabeled": 8}
    assert labelled["options"]["strip_by"] == WEBMAP and labelled["options"]["include"] == "^north_"
    val_pixels = labelled["splits"]["val"]["class_pixels"]  # columns 18, 19 (two chips each): 2·(2+3)·16 building
    assert val_pixels == {"background": 4 * 256 - 160, "building": 160}
    test = shard_dataset(tmp_path / "south", **folders, include="^south_", split="0:0:1")
    assert {k: v["samples"] for k, v in test["splits"].items()} == {"test": 6}
    pool = shard_dataset(tmp_path / "pool", images=tmp_path / "images", include="^south_")
    assert {k: v["samples"] for k, v in pool["splits"].items()} == {"unlabeled": 6}
    assert read_manifest(tmp_path / "pool")["class_map"] is None
    with pytest.raises(DataError, match=r"images: no image file name matches --include '\^east_'"):
        shard_dataset(tmp_path / "none", **folders, include="^east_")
    assert not (tmp_path / "none").exists()
