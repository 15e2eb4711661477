"""shard-data: bit-exact round trips, manifest integrity, leak-free splits, tiling, labelled fraction."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from distseg.cli import app
from distseg.data.classes import ClassMap
from distseg.data.shard import read_manifest, shard_dataset
from distseg.data.synthetic import make_scene, write_dataset


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a shard: key -> {field: bytes}, in file order."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, field = member.name.partition(".")
            out.setdefault(key, {})[field] = tar.extractfile(member).read()
    return out


def all_samples(out: Path) -> dict[str, tuple[str, dict[str, bytes]]]:
    """key -> (split, fields) over every shard of a folder."""
    samples = {}
    for shard in read_manifest(out)["shards"]:
        for key, fields in read_tar(out / shard["name"]).items():
            assert key not in samples, f"{key} written twice"
            samples[key] = (shard["split"], fields)
    return samples


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_round_trip_is_bit_exact(tmp_path, image_format):
    src = write_dataset(tmp_path / "src", 8, (40, 72), seed=1, image_format=image_format)
    out = tmp_path / "out"
    shard_dataset(out, images=src / "images", masks=src / "masks", classes=src / "classes.yaml", seed=3)
    samples = all_samples(out)
    assert sorted(samples) == sorted(p.stem for p in (src / "images").iterdir())
    for key, (_, fields) in samples.items():
        assert fields[image_format] == (src / "images" / f"{key}.{image_format}").read_bytes()
        mask = np.asarray(Image.open(io.BytesIO(fields["mask.png"])))
        np.testing.assert_array_equal(mask, np.asarray(Image.open(src / "masks" / f"{key}.png")))
        meta = json.loads(fields["json"])
        w, h = Image.open(src / "images" / f"{key}.{image_format}").size
        assert meta["source"] == f"{key}.{image_format}" and meta["offset"] == [0, 0]
        assert meta["original_size"] == [w, h] == meta["size"]


def test_manifest_counts_sha256_and_class_pixels(tmp_path):
    src = write_dataset(tmp_path / "src", 12, (32, 48), seed=2, mask_format="color")
    out = tmp_path / "out"
    manifest = shard_dataset(out, images=src / "images", masks=src / "masks", classes=src / "classes.yaml",
                             shard_size="5", command=["distseg", "shard-data"])
    assert manifest == read_manifest(out)
    assert manifest["command"] == ["distseg", "shard-data"] and manifest["version"]
    per_split: dict[str, int] = defaultdict(int)
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        samples = read_tar(out / shard["name"])
        assert list(samples) == shard["keys"] and shard["samples"] == len(samples) <= 5
        per_split[shard["split"]] += len(samples)
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == dict(per_split)
    assert sum(per_split.values()) == 12
    pixels = np.zeros(6, dtype=np.int64)
    for key, (_, fields) in all_samples(out).items():
        pixels += np.bincount(np.asarray(Image.open(io.BytesIO(fields["mask.png"]))).ravel(), minlength=6)[:6]
    counted = sum(np.array(list(s["class_pixels"].values())) for s in manifest["splits"].values())
    np.testing.assert_array_equal(counted, pixels)


def test_split_by_group_never_leaks_and_is_deterministic(tmp_path):
    src = write_dataset(tmp_path / "src", 20, 24, seed=4)
    for sub in ("images", "masks"):
        for i, path in enumerate(sorted((src / sub).iterdir())):
            path.rename(path.with_name(f"site{i % 7}_{path.name}"))
    kwargs = dict(images=src / "images", masks=src / "masks", classes=src / "classes.yaml",
                  group_by=r"^site(\d+)_", split="6:1:1", seed=5)
    manifest = shard_dataset(tmp_path / "a", **kwargs)
    splits_of = defaultdict(set)
    for key, (split, fields) in all_samples(tmp_path / "a").items():
        splits_of[json.loads(fields["json"])["group"]].add(split)
    assert len(splits_of) == 7 and all(len(s) == 1 for s in splits_of.values())
    assert {next(iter(s)) for s in splits_of.values()} == {"train", "val", "test"}
    again = shard_dataset(tmp_path / "b", **kwargs)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_labeled_fraction_moves_train_tiles_to_unlabeled(tmp_path):
    src = write_dataset(tmp_path / "src", 10, 64, seed=6)
    out = tmp_path / "out"
    manifest = shard_dataset(out, images=src / "images", masks=src / "masks", classes=src / "classes.yaml",
                             tile=32, split="1:0:0", labeled_fraction=0.25)
    assert manifest["splits"]["train"]["samples"] == 10  # round(0.25 * 40 tiles)
    assert manifest["splits"]["unlabeled"]["samples"] == 30
    for split, fields in all_samples(out).values():
        assert ("mask.png" in fields) == (split == "train")


def test_tiles_cover_the_image_with_padded_edges(tmp_path):
    src = write_dataset(tmp_path / "src", 1, 8, seed=7)
    image, mask = make_scene(np.random.default_rng(7), (70, 100))
    Image.fromarray(image).save(src / "images" / "scene_0000.png")
    Image.fromarray(mask).save(src / "masks" / "scene_0000.png")
    out = tmp_path / "out"
    shard_dataset(out, images=src / "images", masks=src / "masks", classes=src / "classes.yaml",
                  tile=32, overlap=8, split="1:0:0")
    samples = all_samples(out)
    offsets = sorted(tuple(json.loads(f["json"])["offset"]) for _, f in samples.values())
    assert offsets == [(x, y) for x in (0, 24, 48, 72) for y in (0, 24, 48)]
    for _, fields in samples.values():
        x, y = json.loads(fields["json"])["offset"]
        tile = np.asarray(Image.open(io.BytesIO(fields["png"])))
        tile_mask = np.asarray(Image.open(io.BytesIO(fields["mask.png"])))
        assert tile.shape == (32, 32, 3)
        part = image[y:y + 32, x:x + 32]
        np.testing.assert_array_equal(tile[: part.shape[0], : part.shape[1]], part)
        np.testing.assert_array_equal(tile_mask[: part.shape[0], : part.shape[1]], mask[y:y + 32, x:x + 32])
        assert (tile[part.shape[0]:] == 0).all() and (tile_mask[part.shape[0]:] == 255).all()
        assert (tile_mask[:, part.shape[1]:] == 255).all()


def test_unlabelled_only_and_extra_unlabelled_folder(tmp_path):
    src = write_dataset(tmp_path / "src", 4, 32, seed=8, n_unlabeled=3)
    manifest = shard_dataset(tmp_path / "u", images=src / "unlabeled")
    assert manifest["class_map"] is None and manifest["splits"] == {"unlabeled": {"samples": 3, "sources": 3}}
    both = shard_dataset(tmp_path / "b", images=src / "images", masks=src / "masks",
                         classes=src / "classes.yaml", unlabeled=src / "unlabeled", split="1:0:0")
    assert both["splits"]["train"]["samples"] == 4 and both["splits"]["unlabeled"]["samples"] == 3


def test_shard_size_in_bytes_rolls_shards(tmp_path):
    src = write_dataset(tmp_path / "src", 10, 48, seed=9)
    manifest = shard_dataset(tmp_path / "out", images=src / "images", masks=src / "masks",
                             classes=src / "classes.yaml", split="1:0:0", shard_size="20KB")
    assert len(manifest["shards"]) > 1
    assert all(s["bytes"] <= 20_000 + 1024 + 10240 or s["samples"] == 1  # + end blocks, record
               for s in manifest["shards"])


def test_inspect_prints_tables(tmp_path):
    src = write_dataset(tmp_path / "src", 6, 32, seed=10)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["shard-data", str(out), "--images", str(src / "images"), "--masks",
                                 str(src / "masks"), "--classes", str(src / "classes.yaml"), "--split", "4:1:1"])
    assert result.exit_code == 0, result.output
    command = read_manifest(out)["command"]
    assert command[:3] == ["distseg", "shard-data", str(out)] and command[command.index("--split") + 1] == "4:1:1"
    shown = runner.invoke(app, ["inspect", str(out)], terminal_width=200)
    assert shown.exit_code == 0
    for word in ("splits", "class pixel share", "farmland", "train-000000.tar", "val", "test"):
        assert word in shown.output


def test_tif_and_grey_images_are_re_encoded_losslessly(tmp_path):
    src = write_dataset(tmp_path / "src", 2, 24, seed=11)
    rgb = np.asarray(Image.open(src / "images" / "scene_0000.png"))
    (src / "images" / "scene_0000.png").unlink()
    Image.fromarray(rgb).save(src / "images" / "scene_0000.tif")
    grey = np.asarray(Image.open(src / "images" / "scene_0001.png").convert("L"))
    Image.fromarray(grey).save(src / "images" / "scene_0001.png")
    shard_dataset(tmp_path / "out", images=src / "images", masks=src / "masks", classes=src / "classes.yaml",
                  split="1:0:0")
    samples = all_samples(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(samples["scene_0000"][1]["png"]))), rgb)
    stored = np.asarray(Image.open(io.BytesIO(samples["scene_0001"][1]["png"])))
    assert stored.shape == (24, 24, 3) and (stored == grey[..., None]).all()


@pytest.mark.parametrize("by_colour", [True, False])
def test_palette_masks_match_by_colour_or_by_index(tmp_path, by_colour):
    src = write_dataset(tmp_path / "src", 1, 24, seed=12, mask_format="color" if by_colour else "index")
    original = Image.open(src / "masks" / "scene_0000.png")
    expected = ClassMap.from_file(src / "classes.yaml").encode(np.asarray(original), "m")
    if by_colour:  # an RGB colour mask re-saved as a palette PNG, as some annotation tools do
        palette_mask = original.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:  # palette indices are the class values; the palette's colours must not matter
        palette_mask = original.convert("P")
        palette_mask.putpalette([255 - i for i in range(256)] * 3)
    palette_mask.save(src / "masks" / "scene_0000.png")
    assert Image.open(src / "masks" / "scene_0000.png").mode == "P"
    shard_dataset(tmp_path / "out", images=src / "images", masks=src / "masks", classes=src / "classes.yaml",
                  split="1:0:0")
    stored = np.asarray(Image.open(io.BytesIO(all_samples(tmp_path / "out")["scene_0000"][1]["mask.png"])))
    np.testing.assert_array_equal(stored, expected)


def test_shards_are_plain_webdataset(tmp_path):
    import webdataset as wds

    src = write_dataset(tmp_path / "src", 3, 24, seed=13)
    out = tmp_path / "out"
    manifest = shard_dataset(out, images=src / "images", masks=src / "masks", classes=src / "classes.yaml",
                             split="1:0:0")
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == manifest["shards"][0]["keys"]
    assert all({"png", "mask.png", "json"} <= set(s) for s in samples)


def test_assign_pins_groups_to_splits_and_splits_the_rest(tmp_path):
    from distseg.data.errors import DataError
    from distseg.data.splitting import parse_assign

    assert parse_assign("val=site2, test=site5,test=site6") == {"site2": "val", "site5": "test", "site6": "test"}
    for bad, message in (("val:site2", "SPLIT=GROUP"), ("dev=site2", "SPLIT=GROUP"), ("val=a,test=a", "both")):
        with pytest.raises(DataError, match=message):
            parse_assign(bad)
    src = write_dataset(tmp_path / "src", 14, 24, seed=4)
    for sub in ("images", "masks"):
        for i, path in enumerate(sorted((src / sub).iterdir())):
            path.rename(path.with_name(f"site{i % 7}_{path.name}"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["shard-data", str(out), "--images", str(src / "images"), "--masks",
                                      str(src / "masks"), "--classes", str(src / "classes.yaml"), "--group-by",
                                      r"^(site\d+)_", "--assign", "val=site2,test=site5,test=site6",
                                      "--split", "1:0:0"])
    assert result.exit_code == 0, result.output
    splits_of = defaultdict(set)
    for _, (split, fields) in all_samples(out).items():
        splits_of[json.loads(fields["json"])["group"]].add(split)
    assert splits_of == {"site0": {"train"}, "site1": {"train"}, "site2": {"val"}, "site3": {"train"},
                         "site4": {"train"}, "site5": {"test"}, "site6": {"test"}}
    assert read_manifest(out)["options"]["assign"] == "val=site2,test=site5,test=site6"
    with pytest.raises(DataError, match=r"group\(s\) \['site9'\] that no labelled file belongs to"):
        shard_dataset(tmp_path / "bad", images=src / "images", masks=src / "masks", classes=src / "classes.yaml",
                      group_by=r"^(site\d+)_", assign="val=site9")
