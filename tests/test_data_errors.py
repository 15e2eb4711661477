"""shard-data bad input: one stderr line naming the file and the problem, exit 2, no partial output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from distseg.cli import app
from distseg.data.synthetic import write_dataset


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "src", 4, 32, seed=0, mask_format="color")


def run(src: Path, out: Path, *extra: str) -> tuple[int, str]:
    args = ["shard-data", str(out), "--images", str(src / "images"), "--masks", str(src / "masks"),
            "--classes", str(src / "classes.yaml"), "--split", "1:0:0", *extra]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stderr


def assert_fails(src: Path, tmp_path: Path, *needles: str, extra: tuple[str, ...] = ()) -> None:
    out = tmp_path / "out"
    code, err = run(src, out, *extra)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists(), "a failed run must leave no output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")], "temporary folder left behind"


def test_mask_size_differs(src, tmp_path):
    mask = src / "masks" / "scene_0001.png"
    Image.open(mask).resize((31, 32)).save(mask)
    assert_fails(src, tmp_path, str(mask), "mask size 31x32 differs", "scene_0001.png (32x32)")


def test_image_without_mask(src, tmp_path):
    (src / "masks" / "scene_0002.png").unlink()
    assert_fails(src, tmp_path, str(src / "images" / "scene_0002.png"), "has no mask")


def test_unknown_colour_reports_value_count_and_file_then_ignore_option(src, tmp_path):
    mask = src / "masks" / "scene_0003.png"
    pixels = np.asarray(Image.open(mask)).copy()
    pixels[:2, :3] = (1, 2, 3)
    Image.fromarray(pixels).save(mask)
    assert_fails(src, tmp_path, str(mask), "colour (1, 2, 3) (6 px) not in the class map")
    code, err = run(src, tmp_path / "ok", "--unknown", "ignore")
    assert code == 0, err


def test_truncated_image(src, tmp_path):
    image = src / "images" / "scene_0000.png"
    image.write_bytes(image.read_bytes()[:200])
    assert_fails(src, tmp_path, str(image), "truncated")


def test_empty_input_folder(src, tmp_path):
    for path in (src / "images").iterdir():
        path.unlink()
    assert_fails(src, tmp_path, str(src / "images"), "empty image folder")


def test_malformed_class_map(src, tmp_path):
    (src / "classes.yaml").write_text("classes:\n  - {name: road, index: 0\n")
    assert_fails(src, tmp_path, str(src / "classes.yaml"), "malformed class map")


def test_group_regex_that_does_not_match(src, tmp_path):
    assert_fails(src, tmp_path, "scene_0000.png", "does not match", extra=("--group-by", r"tile(\d+)"))


def test_refuses_non_empty_out_without_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run(src, out)
    assert code == 2 and "not empty" in err and (out / "keep.txt").exists()
    code, err = run(src, out, "--force")  # --force replaces only a shard folder: this one holds notes alone
    assert code == 2 and "not a shard folder" in err and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    assert run(src, out)[0] == 0
    code, err = run(src, out, "--force")
    assert code == 0, err
    assert (out / "manifest.json").exists()


def test_failure_with_force_keeps_previous_output(src, tmp_path):
    out = tmp_path / "out"
    assert run(src, out)[0] == 0
    before = (out / "manifest.json").read_text()
    (src / "masks" / "scene_0002.png").unlink()
    code, _ = run(src, out, "--force")
    assert code == 2 and (out / "manifest.json").read_text() == before
