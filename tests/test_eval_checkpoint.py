"""Eval of a stage folder: the headline is the model at the end of the fixed schedule (``last/``); the model validation
chose (``best/``) is reported beside it (eval.json's ``best_val``, the results table's best-val columns), never
instead."""
from __future__ import annotations

import copy
import csv
import json
import shutil

import pytest
import torch
import yaml

from conftest import TINY_MODEL, launch
from distseg.engine.distributed import DistEnv

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
SPLIT = "test"


def _stage(folder, last: int, best: int | None, steps: int = 8, best_step: int | None = 4):
    """A finished stage folder as the training loop leaves it: ``last/`` from seed ``last``, ``best/`` from seed
    ``best`` (None: the stage never validated) and a copy of the chosen one at the root. Returns the models."""
    from distseg.data.synthetic import class_map_dict
    from distseg.engine.checkpoint import stage_record, write_json_atomic
    from distseg.models import ModelConfig, build_model
    from distseg.models.weights import save_weights

    mcfg = dict(TINY_MODEL, num_classes=6)
    models = {}
    for name, seed in (("last", last), ("best", best)):
        if seed is not None:
            torch.manual_seed(seed)
            models[name] = build_model(ModelConfig(**mcfg)).eval()
            (folder / name).mkdir(parents=True)
            save_weights(models[name], folder / name / "model.safetensors")
    shutil.copy2(folder / ("best" if best is not None else "last") / "model.safetensors", folder / "model.safetensors")
    record = stage_record("finetune", {"model": mcfg}, class_map_dict("target"), None)
    write_json_atomic(folder / "stage.json", dict(record, finished=True, steps=steps,
                                                   best_step=best_step if best is not None else None))
    return models


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Three stage folders: validated mid-way (best step 4 of 8), never validated, and validated best at the end
    (whose best/ holds other weights than last/ here, so that evaluating it a second time would show)."""
    root = tmp_path_factory.mktemp("stages")
    return {name: (root / name, _stage(root / name, *args, **kw)) for name, args, kw in (
        ("validated", (1, 2), {}), ("plain", (1, None), {}), ("at_end", (1, 2), {"best_step": 8}))}


def _reference(model, shards) -> dict:
    """Whole-tile metrics of a model held in memory (not loaded from any folder)."""
    from distseg.data.stream import StreamConfig
    from distseg.engine.metrics import evaluate_model
    from distseg.stages.data import data_class_map, make_loader

    loader = make_loader(str(shards), SPLIT, StreamConfig(), CPU, batch_size=4, train=False)
    return evaluate_model(model, loader, data_class_map(str(shards)), CPU, torch.autocast("cpu", enabled=False))


def _evaluate(monkeypatch, folder, shards, out, **kw) -> dict:
    """evaluate.run in this process (no process group: one rank on the CPU)."""
    from distseg.stages import evaluate

    monkeypatch.setattr(evaluate, "init_distributed", lambda *a, **k: CPU)
    return evaluate.run(str(folder), str(shards), split=SPLIT, sliding=False, out=str(out), **kw)


def test_the_headline_is_the_last_model_and_best_val_is_beside_it(stages, target_shards, tmp_path):
    folder, models = stages["validated"]
    last, best = (_reference(models[k], target_shards) for k in ("last", "best"))
    assert last["confusion"] != best["confusion"], "the two models must differ for the test to tell them apart"
    launch("evaluate.py", str(folder), "--data", str(target_shards), "--split", SPLIT, "--no-sliding",
           "--out", str(tmp_path))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert (saved["checkpoint"], saved["step"], saved["weights"]) == ("last", 8, "last/model.safetensors")
    assert saved["whole_tile"]["confusion"] == last["confusion"]
    assert saved["whole_tile"]["miou"] == pytest.approx(last["miou"])
    assert saved["best_val"]["step"] == 4 and saved["best_val"]["whole_tile"]["confusion"] == best["confusion"]
    assert saved["best_val"]["whole_tile"]["miou"] == pytest.approx(best["miou"])


def test_best_val_only_when_validated_reused_at_the_last_step_and_chosen_on_request(stages, target_shards,
                                                                                    tmp_path, monkeypatch):
    from distseg.stages.common import StageError

    plain = _evaluate(monkeypatch, stages["plain"][0], target_shards, tmp_path / "plain")
    assert "best_val" not in plain and plain["checkpoint"] == "last"
    assert plain["whole_tile"]["confusion"] == _reference(stages["plain"][1]["last"], target_shards)["confusion"]
    at_end = _evaluate(monkeypatch, stages["at_end"][0], target_shards, tmp_path / "at_end")
    assert at_end["best_val"] == {"step": 8, "whole_tile": at_end["whole_tile"]}, "same step: not evaluated twice"
    folder, models = stages["validated"]
    chosen = _evaluate(monkeypatch, folder, target_shards, tmp_path / "best", checkpoint="best")
    assert (chosen["checkpoint"], chosen["step"], chosen["weights"]) == ("best", 4, "best/model.safetensors")
    assert chosen["whole_tile"]["confusion"] == _reference(models["best"], target_shards)["confusion"]
    with pytest.raises(StageError, match="never validated"):
        _evaluate(monkeypatch, stages["plain"][0], target_shards, tmp_path / "x", checkpoint="best")


def test_results_rows_carry_the_headline_and_the_best_val_model(stages, target_shards, tmp_path, monkeypatch):
    from distseg.pipeline import build_plan, load_recipe
    from distseg.pipeline.launch import decide
    from distseg.pipeline.results import collect_rows, write_results

    recipe = {"name": "t", "launcher": "python", "model": {"backbone": "test_resnet"},
              "datasets": {"target": str(target_shards)},
              "stages": [{"name": f"eval_{k}", "kind": "eval", "data": "target", "weights": str(stages[k][0]),
                          "label": k} for k in ("validated", "plain")]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = build_plan(load_recipe(path, out=str(tmp_path / "run")), path)
    saved = {s.spec.label: _evaluate(monkeypatch, s.parent_path, target_shards, s.folder) for s in plan.stages}
    assert [decide(s, False).action for s in plan.stages] == ["skip", "skip"]
    validated, plain = collect_rows(plan)
    assert validated.miou == saved["validated"]["whole_tile"]["miou"]
    assert validated.best_val_miou == saved["validated"]["best_val"]["whole_tile"]["miou"] != validated.miou
    assert validated.best_val_step == 4
    assert validated.best_val_per_class_iou == saved["validated"]["best_val"]["whole_tile"]["per_class_iou"]
    assert (plain.best_val_miou, plain.best_val_step, plain.best_val_per_class_iou) == (None, None, None)
    md, table = write_results([validated, plain], tmp_path, "t")
    with open(table) as fh:
        lines = list(csv.DictReader(fh))
    assert list(lines[0])[-8:] == ["best_val_step", "best_val_miou", *[f"best_val_iou_{c}" for c in
                                                                        validated.class_names]]
    assert float(lines[0]["best_val_miou"]) == pytest.approx(validated.best_val_miou, rel=1e-5)
    assert lines[0]["best_val_step"] == "4" and lines[1]["best_val_miou"] == lines[1]["best_val_step"] == ""
    header = md.read_text().splitlines()[4].split(" | ")
    cells = [line.split(" | ") for line in md.read_text().splitlines()[6:]]
    at = header.index("best-val mIoU (step)")
    assert cells[0][at] == f"{100 * validated.best_val_miou:.2f} (4)" and cells[1][at] == ""

    old = json.loads((plan.stages[0].folder / "eval.json").read_text())
    del old["checkpoint"]  # written before the rule: it measured the folder root, the best-validation model
    (plan.stages[0].folder / "eval.json").write_text(json.dumps(old))
    assert decide(plan.stages[0], False).action == "start"


def test_adapt_bn_measures_the_model_with_statistics_of_the_given_imagery(stages, target_shards, tmp_path,
                                                                          monkeypatch):
    """--adapt-bn: the headline and the best-val model are both measured after AdaBN on the folders' unlabelled
    split, equal to adapting the in-memory model with ops/adabn.py; a recipe's eval ``unlabeled`` passes it, and an
    eval.json adapted on other folders (or none) is out of date."""
    from distseg.data.stream import StreamConfig
    from distseg.ops.adabn import reestimate_bn
    from distseg.pipeline import build_plan, load_recipe
    from distseg.pipeline.launch import decide
    from distseg.stages.common import StageError
    from distseg.stages.data import make_loader

    folder, models = stages["validated"]
    saved = _evaluate(monkeypatch, folder, target_shards, tmp_path / "a", adapt_bn=[str(target_shards)])
    assert saved["adapt_bn"] == {"folders": [str(target_shards)], "split": "unlabeled", "images": 16}
    for key, got in (("last", saved["whole_tile"]), ("best", saved["best_val"]["whole_tile"])):
        model = copy.deepcopy(models[key])
        pool = make_loader(str(target_shards), "unlabeled", StreamConfig(), CPU, batch_size=4, train=False)
        reestimate_bn(model, (b.image for b in pool))
        assert got["confusion"] == _reference(model, target_shards)["confusion"]
        assert got["confusion"] != _reference(models[key], target_shards)["confusion"], "AdaBN changed nothing"
    with pytest.raises(StageError, match="not a shard folder"):
        _evaluate(monkeypatch, folder, target_shards, tmp_path / "b", adapt_bn=[str(tmp_path / "none")])

    recipe = {"name": "t", "launcher": "python", "model": {"backbone": "test_resnet"},
              "datasets": {"target": str(target_shards)},
              "stages": [{"name": "eval_a", "kind": "eval", "data": "target", "weights": str(folder),
                          "unlabeled": ["target"]}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    stage, = build_plan(load_recipe(path, out=str(tmp_path / "run")), path).stages
    assert stage.command[-2:] == ["--adapt-bn", str(target_shards)]
    stage.folder.mkdir(parents=True)
    shutil.copy2(tmp_path / "a" / "eval.json", stage.folder / "eval.json")
    assert decide(stage, False).action == "skip"
    stage.adapt_bn = []
    assert decide(stage, False).action == "start", "an adapted eval.json does not stand for a plain one"
