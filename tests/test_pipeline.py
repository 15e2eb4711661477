"""Recipe validation (each bad input fails before anything runs), skip/resume decisions and the results table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distseg.cli import app
from distseg.data.shard import shard_dataset
from distseg.data.synthetic import write_dataset
from distseg.pipeline import RecipeError, build_plan, load_recipe, run_recipe
from distseg.pipeline.launch import decide
from distseg.pipeline.recipe import substitute
from distseg.pipeline.results import ResultRow, table


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Tiny target (6 classes) and intermediate (8 classes) shard folders."""
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for domain, seed in (("target", 0), ("intermediate", 1)):
        raw = write_dataset(root / f"raw_{domain}", 10, 64, domain, seed=seed)
        shard_dataset(root / domain, images=raw / "images", masks=raw / "masks", classes=raw / "classes.yaml",
                      split="6:2:2")
        out[domain] = root / domain
    out["init"] = root / "init.safetensors"
    out["init"].write_bytes(b"")  # only its existence is checked before a run
    return out


def _recipe(tmp_path: Path, shards: dict[str, Path], stages: list[dict], **extra) -> Path:
    data = {"name": "t", "launcher": "python", "model": {"backbone": "test_resnet"},
            "datasets": {"target": str(shards["target"]), "inter": str(shards["intermediate"])},
            "stages": stages, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _plan(path: Path, tmp_path: Path):
    return build_plan(load_recipe(path, out=str(tmp_path / "run")), path)


HEAD = {"name": "head", "kind": "head", "data": "target", "weights": "init.safetensors"}


@pytest.mark.parametrize("stages, message", [
    ([HEAD, {"name": "kd", "kind": "distill", "data": "target", "parent": "nope"}], "unknown stage 'nope'"),
    ([{"name": "a", "kind": "distill", "data": "target", "parent": "b"},
      {"name": "b", "kind": "distill", "data": "target", "parent": "a"}], "cycle in stage parents: "),
    ([HEAD, {"name": "kd", "kind": "distill", "data": "missing", "parent": "head"}], "unknown dataset 'missing'"),
    ([HEAD, {"name": "kd", "kind": "distill", "data": "inter", "parent": "head"}], "class-map mismatch"),
    ([HEAD, {"name": "ev", "kind": "eval", "data": "inter", "parent": "head"}], "class-map mismatch"),
    ([HEAD, HEAD], "duplicate stage name"),
    ([{"name": "h", "kind": "head", "data": "target"}], "a head stage needs a parent (stage folder or weights) or model.pretrained"),
    ([{**HEAD, "overrides": {"train": {"stepz": 3}}}], "unknown key(s) ['stepz']"),
    ([{**HEAD, "overrides": {"out": "elsewhere"}}], "may not set ['out']"),
])
def test_bad_recipes_fail_before_anything_runs(tmp_path, shards, stages, message):
    (tmp_path / "init.safetensors").write_bytes(b"")
    path = _recipe(tmp_path, shards, stages)
    with pytest.raises(RecipeError) as info:
        run_recipe(path, out=str(tmp_path / "run"))
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert not (tmp_path / "run").exists()


def test_mismatch_error_names_the_stage_and_is_fixed_by_a_head_stage(tmp_path, shards):
    (tmp_path / "init.safetensors").write_bytes(b"")
    bad = [HEAD, {"name": "kd", "kind": "distill", "data": "inter", "parent": "head"}]
    with pytest.raises(RecipeError, match="stage 'kd': class-map mismatch"):
        _plan(_recipe(tmp_path, shards, bad), tmp_path)
    good = [HEAD, {"name": "head2", "kind": "head", "data": "inter", "parent": "head"},
            {"name": "kd", "kind": "distill", "data": "inter", "parent": "head2"}]
    assert [s.name for s in _plan(_recipe(tmp_path, shards, good), tmp_path).stages] == ["head", "head2", "kd"]


def test_missing_shard_folder_and_weights(tmp_path, shards):
    path = _recipe(tmp_path, {**shards, "target": tmp_path / "nowhere"}, [HEAD])
    with pytest.raises(RecipeError, match=r"dataset 'target': .*nowhere is not a shard folder"):
        _plan(path, tmp_path)
    with pytest.raises(RecipeError, match=r"stage 'head': weights .*init.safetensors do not exist"):
        _plan(_recipe(tmp_path, shards, [HEAD]), tmp_path)


def test_cli_reports_bad_recipe_in_one_line(tmp_path, shards):
    path = _recipe(tmp_path, shards, [{"name": "a", "kind": "ssl", "data": "target", "parent": "a"}])
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and "cycle in stage parents: a -> a" in result.output


def test_variables_and_relative_paths(tmp_path, shards, monkeypatch):
    (tmp_path / "init.safetensors").write_bytes(b"")
    path = _recipe(tmp_path, shards, [{**HEAD, "weights": "${W}"}], vars={"W": "missing.safetensors"})
    monkeypatch.setenv("W", "also-missing")
    recipe = load_recipe(path, {"W": "init.safetensors"})  # command line beats environment beats vars
    assert recipe.stages[0].weights == str(tmp_path / "init.safetensors")
    assert recipe.out == str(Path("runs/t").resolve())
    assert load_recipe(path).stages[0].weights == str(tmp_path / "also-missing")
    assert substitute({"seed": "${S}", "p": "a/${S}", "l": ["${X}"]}, {"S": "3", "X": "/d"}, "r.yaml") == \
        {"seed": 3, "p": "a/3", "l": ["/d"]}
    with pytest.raises(RecipeError, match=r"variable \$\{NOPE\} is not set"):
        substitute({"a": ["x/${NOPE}"]}, {}, "r.yaml")


def test_decisions_skip_resume_restart(tmp_path, shards):
    (tmp_path / "init.safetensors").write_bytes(b"")
    stages = [HEAD, {"name": "kd", "kind": "distill", "data": "target", "parent": "head"}]
    plan = _plan(_recipe(tmp_path, shards, stages), tmp_path)
    head, kd = plan.stages
    assert decide(head, False).action == "start"
    head.folder.mkdir(parents=True)
    record = {"finished": True, "identity": json.loads(json.dumps(head.identity))}
    (head.folder / "stage.json").write_text(json.dumps(record))
    (head.folder / "model.safetensors").write_bytes(b"")
    assert decide(head, False).action == "skip"
    assert decide(head, True).action == "restart" and decide(kd, True).action == "start"
    (head.folder / "stage.json").write_text(json.dumps({**record, "finished": False}))
    assert decide(head, False).flags == ["--resume"]
    config = record["identity"]["config"]
    changed = {**record, "identity": {**record["identity"], "config": {**config, "train": {**config["train"], "steps": 7}}}}
    (head.folder / "stage.json").write_text(json.dumps(changed))
    assert decide(head, False).flags == ["--force"] and decide(head, False).reason == "config changed"


def test_table_columns_union_and_na():
    rows = [ResultRow("a", "s1", "test", ["x", "y"], [0.5, None], 0.5, 0.9, 10, 0, 12.0, 30.0, 55.4),
            ResultRow("b", "s2", "test", ["x", "z"], [0.25, 1.0], 0.625, None, None, 5, None, None, None)]
    header, cells = table(rows)
    assert header == ["row", "stage", "x", "y", "z", "mIoU", "labelled", "unlabelled", "stage s", "chain s",
                      "chain CPU s"]
    assert cells[0] == ["a", "s1", "50.00", "n/a", "", "50.00", "10", "0", "12", "30", "55"]
    assert cells[1] == ["b", "s2", "25.00", "", "100.00", "62.50", "n/a", "5", "n/a", "n/a", "n/a"]


def test_ssl_pool_from_another_dataset_and_layering(tmp_path, shards):
    (tmp_path / "init.safetensors").write_bytes(b"")
    (tmp_path / "pool").mkdir()
    stages = [HEAD, {"name": "kd", "kind": "distill", "data": "target", "parent": "head",
                     "overrides": {"train": {"steps": 9}}},
              {"name": "semi", "kind": "ssl", "data": "target", "parent": "kd", "unlabeled": "pool"}]
    path = _recipe(tmp_path, shards, stages, defaults={"train": {"steps": 5, "seed": 3}, "optim": {"lr": 0.5}},
                   kind_defaults={"ssl": {"train": {"steps": 7}}})
    data = yaml.safe_load(path.read_text())
    data["datasets"]["pool"] = {"shard": {"unlabeled": "pool"}}
    path.write_text(yaml.safe_dump(data))
    head, kd, semi = _plan(path, tmp_path).stages
    assert semi.config.data.unlabeled == (str(tmp_path / "run" / "shards" / "pool"),)
    assert semi.config.data.shards == str(shards["target"])
    assert [s.config.train.steps for s in (head, kd, semi)] == [5, 9, 7]
    assert {s.config.train.seed for s in (head, kd, semi)} == {3} and semi.config.optim.lr == 0.5
    assert semi.config.parent == str(kd.folder) and head.config.parent == str(tmp_path / "init.safetensors")


def test_seeds_expand_the_chain_and_the_table_averages_them(tmp_path, shards):
    (tmp_path / "init.safetensors").write_bytes(b"")
    stages = [HEAD, {"name": "kd", "kind": "distill", "data": "target", "parent": "head"},
              {"name": "eval_kd", "kind": "eval", "data": "target", "parent": "kd", "label": "KD"}]
    plan = _plan(_recipe(tmp_path, shards, stages, seeds=[0, 1]), tmp_path)
    names = [s.name for s in plan.stages]
    assert names == ["head.s0", "kd.s0", "eval_kd.s0", "head.s1", "kd.s1", "eval_kd.s1"]
    by = plan.by_name()
    assert by["kd.s1"].spec.parent == "head.s1" and by["kd.s1"].config.train.seed == 1
    assert by["eval_kd.s0"].spec.label == by["eval_kd.s1"].spec.label == "KD"
    row = lambda label, seed, miou: ResultRow(label, f"kd.s{seed}", "test", ["x"], [miou], miou, None, 8, 0, 10.0,
                                              20.0, 30.0 + seed, seed=seed)
    rows = [row("base", 0, 0.5), row("base", 1, 0.6), row("KD", 0, 0.55), row("KD", 1, 0.62)]
    header, cells = table(rows, baseline="base")
    assert header == ["row", "stage", "x", "mIoU", "± sd", "per seed", "Δ vs base", "labelled", "unlabelled",
                      "stage s", "chain s", "chain CPU s"]
    assert cells[1] == ["KD", "kd", "58.50", "58.50", "4.95", "55.00 / 62.00", "+3.50 (+5.00, +2.00)", "8", "0",
                        "10", "20", "30"]
    with pytest.raises(RecipeError, match="seeds must be distinct"):
        load_recipe(_recipe(tmp_path, shards, stages, seeds=[1, 1]))
    shared = _plan(_recipe(tmp_path, shards, [{**HEAD, "once": True}, *stages[1:]], seeds=[0, 1]), tmp_path)
    assert [s.name for s in shared.stages] == ["head", "kd.s0", "eval_kd.s0", "kd.s1", "eval_kd.s1"]
    assert shared.by_name()["kd.s1"].spec.parent == "head" and shared.by_name()["head"].config.train.seed == 0


def test_only_selects_stages_by_pattern_with_their_ancestors(tmp_path, shards):
    (tmp_path / "init.safetensors").write_bytes(b"")
    stages = [{**HEAD, "once": True}, {"name": "kd", "kind": "distill", "data": "target", "parent": "head"},
              {"name": "kd2", "kind": "distill", "data": "target", "parent": "kd"},
              {"name": "eval_kd", "kind": "eval", "data": "target", "parent": "kd", "label": "KD"},
              {"name": "eval_kd2", "kind": "eval", "data": "target", "parent": "kd2", "label": "KD2"}]
    plan = _plan(_recipe(tmp_path, shards, stages, seeds=[0, 1]), tmp_path)
    names = lambda patterns: [s.name for s in plan.selected(patterns)]
    assert names([]) == [s.name for s in plan.stages]
    assert names(["eval_kd"]) == ["head", "kd.s0", "eval_kd.s0", "kd.s1", "eval_kd.s1"]
    assert names(["eval_kd2.s1"]) == ["head", "kd.s1", "kd2.s1", "eval_kd2.s1"]
    assert names(["eval_*.s0", "head"]) == ["head", "kd.s0", "kd2.s0", "eval_kd.s0", "eval_kd2.s0"]
    with pytest.raises(RecipeError, match=r"--only 'kd3' matches no stage \(stages: \['eval_kd', 'eval_kd2', 'head'"):
        plan.selected(["kd3"])
    result = CliRunner().invoke(app, ["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"),
                                      "--dry-run", "--only", "kd2.s0,eval_kd.s1"])
    assert result.exit_code == 0, result.output
    listed = [line.split("--out ")[1].split()[0].rsplit("/", 1)[1] for line in result.output.splitlines()
              if "--out" in line]
    assert listed == ["head", "kd.s0", "kd2.s0", "kd.s1", "eval_kd.s1"]
