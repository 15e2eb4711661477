"""Real data: shard the Dubai aerial set (RGB and palette colour masks) and check its class shares."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import yaml

from distseg.data.shard import shard_dataset
from distseg.data.stream import StreamConfig, build_loader

SHARED = Path(__file__).resolve().parents[2] / "shared"
DUBAI = SHARED / "data" / "dubai_aerial"

# Mask colours and pixel shares (%) from the data folder's README.
TABLE = [
    ("building", (60, 16, 152), 13.3),
    ("land", (132, 41, 246), 52.4),
    ("road", (110, 193, 228), 9.4),
    ("vegetation", (254, 221, 58), 10.3),
    ("water", (226, 169, 41), 13.6),
]
IGNORED = [("unlabeled", (155, 155, 155), 0.5), ("gap", (0, 0, 0), 0.56)]


@pytest.fixture(scope="module")
def dubai(tmp_path_factory) -> tuple[Path, dict]:
    if not SHARED.is_dir():
        pytest.skip(f"real data not available: {SHARED} is absent")
    root = tmp_path_factory.mktemp("dubai")
    classes = [{"name": n, "color": list(c)} for n, c, _ in TABLE]
    classes += [{"name": n, "color": list(c), "ignore": True} for n, c, _ in IGNORED]
    (root / "classes.yaml").write_text(yaml.safe_dump({"ignore_index": 255, "classes": classes}))
    manifest = shard_dataset(root / "shards", images=DUBAI / "images", masks=DUBAI / "masks",
                             classes=root / "classes.yaml", group_by=r"tile(\d+)_", split="6:1:1", seed=0,
                             shard_size="16MB")
    return root / "shards", manifest


def test_class_pixel_shares_match_the_readme(dubai):
    _, manifest = dubai
    totals = {name: 0 for name, _, _ in TABLE}
    ignored = 0
    for info in manifest["splits"].values():
        for name, count in info["class_pixels"].items():
            totals[name] += count
        ignored += info["ignore_pixels"]
    everything = sum(totals.values()) + ignored
    for name, _, share in TABLE:
        assert 100 * totals[name] / everything == pytest.approx(share, abs=0.1), name
    assert 100 * ignored / everything == pytest.approx(sum(s for _, _, s in IGNORED), abs=0.1)
    assert sum(info["samples"] for info in manifest["splits"].values()) == 72


def test_scenes_do_not_leak_and_jpegs_are_kept_verbatim(dubai):
    out, manifest = dubai
    scene_split: dict[str, str] = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                data = tar.extractfile(member).read()
                if field == "json":
                    scene = json.loads(data)["group"]
                    assert scene_split.setdefault(scene, shard["split"]) == shard["split"], scene
                elif field == "jpg":
                    assert data == (DUBAI / "images" / f"{key}.jpg").read_bytes()
    assert len(scene_split) == 8 and set(scene_split.values()) == {"train", "val", "test"}


def test_stream_a_training_batch(dubai):
    out, _ = dubai
    cfg = StreamConfig(batch_size=2, num_workers=0)
    batch = next(iter(build_loader(out, "train", cfg)))
    assert batch.image.shape == (2, 3, 512, 512) and set(batch.mask.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
