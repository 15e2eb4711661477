"""Every shipped recipe validates and dry-runs (no data needed), with the commands it would launch."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from distseg.cli import app
from distseg.pipeline import build_plan, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
RECIPES = [p for p in RECIPES if p.name != "dubai_classes.yaml"]
EXPECTED = {"demo", "dubai_10pct", "dubai_ddpm", "eh_mkd_ssl", "eh_ablation", "cityscapes_semi"}


def _vars(tmp_path: Path) -> dict[str, str]:
    return {"DATA": str(tmp_path / "data"), "INIT": str(tmp_path / "init.safetensors")}


def test_all_recipes_are_shipped():
    assert {p.stem for p in RECIPES} == EXPECTED


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_dry_run(recipe, tmp_path):
    plan = build_plan(load_recipe(recipe, _vars(tmp_path), out=str(tmp_path / "run")), recipe, require_inputs=False)
    assert plan.stages, recipe
    evals = [s for s in plan.stages if s.kind == "eval"]
    assert evals, f"{recipe.name} has no eval stage, so no results row"
    seen: set[str] = set()
    for stage in plan.stages:  # parents-first order, every input inside the run or given from outside
        assert stage.spec.parent is None or stage.spec.parent in seen
        seen.add(stage.name)
        assert stage.folder == tmp_path / "run" / stage.name
        if stage.config is not None:
            assert stage.config.out == str(stage.folder)
            assert Path(stage.config.data.shards).is_absolute()
    result = CliRunner().invoke(app, ["run", str(recipe), "--dry-run", "--out", str(tmp_path / "run"),
                                      *[f"--var={k}={v}" for k, v in _vars(tmp_path).items()]])
    assert result.exit_code == 0, result.output
    launcher = {"deepspeed": "deepspeed --num_gpus", "torchrun": "torchrun --nproc_per_node",
                "python": "python -m distseg.stages"}[plan.recipe.launcher]
    assert result.output.count(launcher) == len(plan.stages)
    assert not (tmp_path / "run").exists(), "a dry run must not write anything"


def test_study_recipe_holds_the_study_settings(tmp_path):
    recipe = next(p for p in RECIPES if p.stem == "eh_mkd_ssl")
    plan = build_plan(load_recipe(recipe, _vars(tmp_path)), recipe, require_inputs=False)
    ssl = next(s for s in plan.stages if s.kind == "ssl").config
    distill = next(s for s in plan.stages if s.kind == "distill").config
    assert (ssl.model.backbone, ssl.model.psa) == ("hrnet_w48", "parallel")
    assert ssl.global_batch == 8 and ssl.data.stream.augment.crop_size == 512
    assert (ssl.optim.lr, ssl.loss.kind, ssl.options.tau, ssl.options.ema_alpha) == (1e-3, "ohem", 0.95, 0.999)
    assert distill.options.temperature == 3.0
    kinds = [s.kind for s in plan.stages if s.kind != "eval"]
    assert kinds == ["head", "distill", "head", "distill", "ssl"]


def test_ablation_shares_stages(tmp_path):
    recipe = next(p for p in RECIPES if p.stem == "eh_ablation")
    plan = build_plan(load_recipe(recipe, _vars(tmp_path)), recipe, require_inputs=False)
    evals = [s for s in plan.stages if s.kind == "eval"]
    assert len(evals) == 8
    assert len({s.parent_path for s in evals}) == 8, "each row evaluates its own model"
    names = [s.name for s in plan.stages]
    assert len(names) == len(set(names))


def test_dubai_recipe_validates_against_the_real_data(tmp_path):
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (shared / "dubai_aerial").is_dir():
        pytest.skip(f"real data not available: {shared / 'dubai_aerial'} is absent")
    init = tmp_path / "init.safetensors"
    init.write_bytes(b"")
    recipe = next(p for p in RECIPES if p.stem == "dubai_10pct")
    plan = build_plan(load_recipe(recipe, {"DATA": str(shared), "INIT": str(init)}, out=str(tmp_path / "run")),
                      recipe)  # every input must exist; the class maps come from the recipe's class file
    assert not plan.warnings
    chain = plan.by_name()["chain"].config
    assert chain.data.shards == str(tmp_path / "run" / "shards" / "dubai")
    assert (chain.options.alpha, chain.options.init_from_teacher) == (1.0, True)
    assert plan.recipe.datasets["dubai"].shard.labeled_fraction == 0.1


def test_ddpm_recipe_trains_one_denoiser_for_every_seed(tmp_path):
    from distseg.models.ddpm_head import DDPMSegmenterConfig

    recipe = next(p for p in RECIPES if p.stem == "dubai_ddpm")
    plans = [build_plan(load_recipe(recipe, {**_vars(tmp_path), "SEED": str(seed)}, out=str(tmp_path / "run")),
                        recipe, require_inputs=False) for seed in (0, 1)]
    stages = [{s.name: s for s in plan.stages} for plan in plans]
    ddpm = [s["ddpm"].config for s in stages]
    assert ddpm[0].identity(1) == ddpm[1].identity(1), "every seed must reuse the one ddpm stage"
    assert ddpm[0].data.unlabeled and ddpm[0].options.denoiser.image_size == 64
    head, control = stages[1]["head_s1"].config, stages[1]["control_s1"].config
    assert head.train.seed == 1 and control.options.random_extractor and not head.options.random_extractor
    # the heads' extractor fits the denoiser the ddpm stage trains
    DDPMSegmenterConfig(denoiser=ddpm[0].options.denoiser, extractor=head.options.extractor, num_classes=5)
    finetune = stages[0]["finetune_s0"].config
    assert (finetune.model.backbone, finetune.model.pretrained, finetune.optim.name) == \
        ("efficientnet_lite0", "imagenet", "adamw")
    assert (finetune.train.steps, finetune.train.eval_every, finetune.global_batch) == (200, 25, 8)
