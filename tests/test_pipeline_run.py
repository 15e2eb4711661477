"""A real two-stage ``distseg run`` through the CLI: results table, figure, logs; the second run trains nothing."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distseg.cli import app
from distseg.config import load_config, to_dict
from distseg.data.synthetic import write_dataset
from distseg.pipeline.figure import _row_models, write_figure
from distseg.pipeline import build_plan, load_recipe
from distseg.stages.config import StageConfig

MODEL = {"backbone": "test_resnet", "psa": "parallel", "aspp_channels": 16, "decoder_channels": 16,
         "low_level_channels": 8}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """Raw synthetic folders (sharded by the run itself), a fresh start model, and a head -> distill recipe."""
    import torch

    from distseg.models import ModelConfig, build_model
    from distseg.models.weights import save_weights

    root = tmp_path_factory.mktemp("recipe")
    write_dataset(root / "raw", 10, 64, "target", seed=0)
    torch.manual_seed(0)
    save_weights(build_model(ModelConfig(**MODEL)), root / "init.safetensors")
    data = {
        "name": "tiny", "launcher": "python", "model": MODEL, "figure_tiles": 2,
        "datasets": {"target": {"shard": {"images": "raw/images", "masks": "raw/masks",
                                          "classes": "raw/classes.yaml", "split": "6:2:2", "seed": 0}}},
        "defaults": {"global_batch": 4, "micro_batch": 4,
                     "train": {"steps": 2, "log_every": 1, "fisher_batches": 1, "eval_batch_size": 4},
                     "data": {"stream": {"num_workers": 0, "augment": {"crop_size": 64}}}},
        "stages": [
            {"name": "head", "kind": "head", "data": "target", "weights": "init.safetensors"},
            {"name": "kd", "kind": "distill", "data": "target", "parent": "head"},
            {"name": "eval_head", "kind": "eval", "data": "target", "parent": "head", "label": "teacher"},
            {"name": "eval_kd", "kind": "eval", "data": "target", "parent": "kd", "label": "student"},
        ]}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def first_run(recipe) -> tuple[Path, str]:
    out = recipe.parent / "run"
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_writes_results_for_every_eval_stage(first_run):
    out, output = first_run
    assert f"tensorboard --logdir {out}" in output
    assert (out / "logs" / "head.log").read_text().startswith("==== ")
    assert (out / "head" / "tensorboard").is_dir()
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["row"], r["stage"], r["split"]) for r in rows] == [("teacher", "head", "test"),
                                                                 ("student", "kd", "test")]
    manifest = json.loads((out / "shards" / "target" / "manifest.json").read_text())
    for row, stage in zip(rows, ("head", "kd")):
        eval_json = json.loads((out / f"eval_{stage}" / "eval.json").read_text())
        assert float(row["miou"]) == pytest.approx(eval_json["whole_tile"]["miou"], rel=1e-5)
        assert int(row["labeled"]) == manifest["splits"]["train"]["samples"]
        assert int(row["unlabeled"]) == 0
        assert float(row["stage_seconds"]) > 0
        assert (out / stage / "run.log").is_file()
    assert float(rows[1]["chain_seconds"]) == pytest.approx(
        float(rows[0]["stage_seconds"]) + float(rows[1]["stage_seconds"]), rel=1e-4)
    timings = json.loads((out / "timings.json").read_text())
    assert float(rows[1]["chain_cpu_seconds"]) == pytest.approx(timings["head"]["cpu"] + timings["kd"]["cpu"], rel=1e-4)
    assert timings["kd"]["cpu"] > 1.0, "the stage process's CPU time is counted"
    cost = json.loads((out / "kd" / "stage.json").read_text())["cost"]
    assert timings["kd"] == {"wall": cost["wall_s"], "cpu": cost["cpu_s"]}, "the stage's own record of its cost"
    assert [(p["from_step"], p["to_step"]) for p in cost["pieces"]] == [(0, 2)]
    assert "| teacher | head |" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_figure_leaves_out_a_row_whose_model_is_gone(recipe, first_run, tmp_path):
    """Weights deleted after their eval: the figure draws the other rows and names the one it left out."""

    out, _ = first_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    gone = copy / "kd" / json.loads((copy / "eval_kd" / "eval.json").read_text())["weights"]
    gone.unlink()
    plan = build_plan(load_recipe(recipe, out=str(copy)), recipe)
    evals = [s for s in plan.stages if s.kind == "eval"]
    rows, left_out = _row_models(evals, evals[0].data_path)
    assert [label for label, _ in rows] == ["teacher"]
    assert left_out == [f"student: {gone}: weights missing (stage not finished?)"]
    path, left_out_again = write_figure(plan, tmp_path / "results.png", 2)
    assert path.stat().st_size > 1000 and left_out_again == left_out
    # a second seed of the same row whose model is on disk draws the row instead
    head_eval = next(s for s in evals if s.name == "eval_head")
    second_seed = dataclasses.replace(head_eval, spec=dataclasses.replace(head_eval.spec, label="student"))
    rows, left_out = _row_models(evals + [second_seed], evals[0].data_path)
    assert [label for label, _ in rows] == ["teacher", "student"] and left_out == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_saved_stage_config_is_what_ran(first_run):
    out, _ = first_run
    saved = load_config(StageConfig, out / "configs" / "kd.yaml")
    record = json.loads((out / "kd" / "stage.json").read_text())
    assert saved.parent == str(out / "head") and saved.train.steps == 2
    assert {k: v for k, v in to_dict(saved).items() if k != "model"} == \
        {k: v for k, v in record["config"].items() if k not in ("model", "ds_config_resolved")}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_second_run_trains_nothing(recipe, first_run):
    out, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")}
    before_eval = (out / "eval_kd" / "eval.json").stat().st_mtime_ns
    timings = (out / "timings.json").read_text()
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")} == before
    assert (out / "eval_kd" / "eval.json").stat().st_mtime_ns == before_eval
    assert (out / "timings.json").read_text() == timings
    dry = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out), "--dry-run"])
    assert dry.output.count("# skip") == 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failure_stops_the_chain_with_the_log_tail(recipe, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    data = yaml.safe_load(recipe.read_text())
    data["datasets"]["target"]["shard"] = {k: str(recipe.parent / v) if k in ("images", "masks", "classes") else v
                                           for k, v in data["datasets"]["target"]["shard"].items()}
    data["stages"][0]["weights"] = str(broken)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "stage 'head' failed" in result.output and "broken.safetensors" in result.output
    assert (tmp_path / "run" / "logs" / "head.log").is_file()
    assert not (tmp_path / "run" / "kd").exists() and not (tmp_path / "run" / "results.csv").exists()
