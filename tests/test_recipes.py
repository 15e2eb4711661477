"""Every shipped recipe validates and dry-runs (no data needed), with the commands it would launch."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distseg.cli import app
from distseg.data.splitting import (
    labeled_subset,
    parse_ratio,
    strip_extent,
    strip_splits,
)
from distseg.pipeline import build_plan, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
RECIPES = [p for p in RECIPES if p.name != "dubai_classes.yaml"]
EXPECTED = {"demo", "dubai_10pct", "dubai_dapt", "dubai_ddpm", "dubai_long", "eh_mkd_ssl", "eh_ablation",
            "cityscapes_semi", "oam_transfer"}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _vars(tmp_path: Path) -> dict[str, str]:
    return {"DATA": str(tmp_path / "data"), "INIT": str(tmp_path / "init.safetensors")}


def test_all_recipes_are_shipped():
    from typer.testing import CliRunner

    from distseg.cli import app
    from distseg.resources import shipped_recipes

    assert {p.stem for p in RECIPES} == EXPECTED == set(shipped_recipes())
    help_text = " ".join(CliRunner().invoke(app, ["run", "--help"], terminal_width=400).output.split())
    assert all(name in help_text for name in EXPECTED), help_text


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
    assert (ssl.optim.lr, ssl.loss.kind, ssl.options.tau, ssl.options.ema.alpha) == (1e-3, "ohem", 0.95, 0.999)
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
    recipe = next(p for p in RECIPES if p.stem == "dubai_10pct")
    default = load_recipe(recipe, out=str(tmp_path / "run"))  # the default DATA finds the checkout's shared data
    assert Path(default.datasets["dubai"].shard.images) == (shared / "dubai_aerial" / "images").resolve()
    plan = build_plan(load_recipe(recipe, {"DATA": str(shared)}, out=str(tmp_path / "run")),
                      recipe)  # every input must exist; the class maps come from the recipe's class file
    assert not plan.warnings
    shard = plan.recipe.datasets["dubai"].shard
    assert (shard.tile, shard.overlap, shard.group_by, shard.assign, shard.labeled_fraction) == \
        (256, 0, r"(tile\d+)_", "val=tile2,test=tile8", 0.1)
    stages = plan.by_name()
    assert [s.name for s in plan.stages if s.name.endswith(".s0")][:7] == \
        ["ft.s0", "ft_ssl.s0", "ft_control.s0", "ft_ssl_adaptive.s0", "skd_teacher.s0", "skd.s0", "skd_ssl.s0"]
    assert {s.config.train.seed for s in plan.stages if s.config and s.name.startswith("ft.")} == {0, 1, 2}
    ssl, control = stages["ft_ssl.s1"].config, stages["ft_control.s1"].config
    assert ssl.parent == control.parent == str(tmp_path / "run" / "ft.s1")
    assert control.options.lambda_u == 0 and ssl.options.lambda_u > 0  # the control differs in lambda_u alone
    assert dataclasses.replace(control.options, lambda_u=ssl.options.lambda_u) == ssl.options
    assert (ssl.train, ssl.optim, ssl.data) == (control.train, control.optim, control.data)
    adaptive = stages["ft_ssl_adaptive.s1"].config
    assert adaptive.options.adaptive_tau and not ssl.options.adaptive_tau  # (f) differs from (c) in adaptive_tau alone
    assert dataclasses.replace(adaptive.options, adaptive_tau=False) == ssl.options and adaptive.parent == ssl.parent
    assert stages["ft.s0"].config.model.pretrained == "imagenet"
    labels = [s.spec.label for s in plan.stages if s.kind == "eval" and s.name.endswith(".s0")]
    assert labels == ["(a) fine-tune", "(b) SKD", "(c) (a) + SSL", "(d) (b) + SSL", "(e) (a) + control",
                      "(f) (c), adaptive τ"]
    assert plan.recipe.baseline == "(a) fine-tune"


def test_ddpm_recipe_trains_one_denoiser_for_every_seed(tmp_path):
    from distseg.models.ddpm_head import DDPMSegmenterConfig

    recipe = next(p for p in RECIPES if p.stem == "dubai_ddpm")
    plan = build_plan(load_recipe(recipe, _vars(tmp_path), out=str(tmp_path / "run")), recipe, require_inputs=False)
    stages = plan.by_name()
    assert [s.name for s in plan.stages if s.kind == "ddpm"] == ["ddpm"], "one denoiser, shared by every seed"
    ddpm = stages["ddpm"].config
    assert ddpm.data.unlabeled and ddpm.options.denoiser.image_size == 64
    head, control = stages["head.s1"].config, stages["control.s1"].config
    assert head.parent == control.parent == str(tmp_path / "run" / "ddpm")
    assert head.train.seed == 1 and control.options.random_extractor and not head.options.random_extractor
    # the heads' extractor fits the denoiser the ddpm stage trains
    DDPMSegmenterConfig(denoiser=ddpm.options.denoiser, extractor=head.options.extractor, num_classes=5)
    finetune = stages["finetune.s0"].config
    assert (finetune.model.backbone, finetune.model.pretrained, finetune.optim.name) == \
        ("efficientnet_lite0", "imagenet", "adamw")
    assert (finetune.train.steps, finetune.train.eval_every, finetune.global_batch) == (200, 25, 8)
    assert plan.recipe.baseline == "ImageNet fine-tune"


def _control_differs_in_lambda_u_alone(ssl, control) -> None:
    """The λ_u = 0 control: same parent, schedule, optimizer and data as its SSL row; only lambda_u differs."""
    assert control.options.lambda_u == 0 and ssl.options.lambda_u > 0
    assert dataclasses.replace(control.options, lambda_u=ssl.options.lambda_u) == ssl.options
    assert (ssl.parent, ssl.train, ssl.optim, ssl.data) == (control.parent, control.train, control.optim, control.data)


def test_dubai_long_gives_ssl_the_schedule_it_needs(tmp_path):
    recipe = next(p for p in RECIPES if p.stem == "dubai_long")
    plan = build_plan(load_recipe(recipe, _vars(tmp_path), out=str(tmp_path / "run")), recipe, require_inputs=False)
    stages = plan.by_name()
    ft, ssl, control = (stages[f"{n}.s2"].config for n in ("ft", "ft_ssl", "ft_control"))
    assert ssl.train.steps >= 1500 and ft.train.steps >= 1000
    _control_differs_in_lambda_u_alone(ssl, control)
    adaptive = stages["ft_ssl_adaptive.s2"].config
    assert dataclasses.replace(adaptive.options, adaptive_tau=False) == ssl.options and adaptive.options.adaptive_tau
    # (g): (f) with UniMatch's perturbations; only the strong view and the feature dropout change, never the
    # labelled crops' augmentation, so (e) stays its equal-step control
    unimatch = stages["ft_ssl_unimatch.s2"].config
    assert dataclasses.replace(unimatch.options, feature_dropout=0.0) == adaptive.options
    strong, before = unimatch.data.stream.augment, adaptive.data.stream.augment
    assert strong.cutmix_prob > 0 and strong.grayscale_prob == 0 and unimatch.options.feature_dropout > 0
    changed = ("cutmix_prob", "grayscale_prob", "jitter_brightness", "jitter_contrast", "jitter_saturation")
    assert before.cutmix_prob == 0 and before.grayscale_prob > 0
    assert all(getattr(strong, f) < getattr(before, f) for f in changed[1:])  # milder colour changes
    assert dataclasses.replace(strong, **{f: getattr(before, f) for f in changed}) == before
    assert (unimatch.parent, unimatch.train, unimatch.optim) == (control.parent, control.train, control.optim)
    for config in (ft, ssl, control, adaptive, unimatch):  # the headline is the last model: no selection by val
        assert config.train.eval_every == 0 and config.train.ckpt_every > 0
    labels = [s.spec.label for s in plan.stages if s.kind == "eval" and s.name.endswith(".s0")]
    assert labels[0] == plan.recipe.baseline == "(a) fine-tune" and any("control" in label for label in labels)
    assert plan.recipe.seeds == [0, 1, 2]


def test_oam_transfer_pools_the_target_imagery_and_tests_on_the_target(tmp_path):
    recipe = next(p for p in RECIPES if p.stem == "oam_transfer")
    for target in ("kampala", "philippines"):
        plan = build_plan(load_recipe(recipe, {**_vars(tmp_path), "TARGET": target}, out=str(tmp_path / target)),
                          recipe, require_inputs=False)
        assert plan.recipe.name == f"oam_transfer_{target}"
        datasets = plan.recipe.datasets
        assert datasets["target"].shard.include == datasets["target_pool"].shard.include == f"^{target}_"
        assert datasets["target"].shard.split == "0:0:1" and datasets["target_pool"].shard.masks is None
        stages = plan.by_name()
        pool = (datasets["nairobi"].path, datasets["target_pool"].path)
        for name in ("ft_ssl", "ft_control", "ft_poolbn", "skd_ssl", "mkd_ssl"):
            assert stages[f"{name}.s1"].config.data.unlabeled == pool, name
            assert stages[f"{name}.s1"].config.data.shards == datasets["nairobi"].path
        # (f) is (c) without pseudo-labels, and (e) is (f) with the labelled crops' BN statistics
        ssl, poolbn, control = (stages[f"{n}.s1"].config for n in ("ft_ssl", "ft_poolbn", "ft_control"))
        _control_differs_in_lambda_u_alone(ssl, poolbn)
        assert poolbn.options.bn_stats == "pool" and ssl.options.source_mix > 0
        assert all(stages[f"{n}.s1"].config.options.balance_bound == 2.0 for n in ("ft_ssl", "skd_ssl", "mkd_ssl"))
        assert ssl.options.balance_by_source, "a rail share per pool folder: Nairobi's chips cannot hide the target's"
        assert dataclasses.replace(control.options, bn_stats="pool") == poolbn.options
        assert (control.parent, control.train, control.optim, control.data) == \
            (poolbn.parent, poolbn.train, poolbn.optim, poolbn.data)
        evals = [s for s in plan.stages if s.kind == "eval"]
        assert {s.data_path for s in evals} == {datasets["target"].path}
        # (g)/(h): (a)'s model measured after AdaBN on (f)'s pool, and on the target's imagery alone
        assert stages["eval_ft_adabn.s1"].adapt_bn == list(pool) and stages["eval_ft_adabn.s1"].parent_path == \
            stages["eval_ft_adabn_target.s1"].parent_path == str(stages["ft.s1"].folder)
        assert stages["eval_ft_adabn_target.s1"].adapt_bn == [datasets["target_pool"].path]
        # (i)/(j): (f) and (c) measured after the same target-only AdaBN
        for name, parent in (("eval_ft_poolbn_adabn_target", "ft_poolbn"), ("eval_ft_ssl_adabn_target", "ft_ssl")):
            assert stages[f"{name}.s1"].adapt_bn == [datasets["target_pool"].path]
            assert stages[f"{name}.s1"].parent_path == str(stages[f"{parent}.s1"].folder)
        assert all(s.eval_options.split == "test" for s in evals)
        # (k)/(l): (c) and its control (f) with the target's imagery alone as the pool, measured as they trained
        tpool_ssl, tpool_control = (stages[f"{n}.s1"].config for n in ("ft_ssl_tpool", "ft_poolbn_tpool"))
        assert tpool_ssl.data.unlabeled == tpool_control.data.unlabeled == (datasets["target_pool"].path,)
        _control_differs_in_lambda_u_alone(tpool_ssl, tpool_control)
        assert dataclasses.replace(tpool_ssl, data=ssl.data, out=ssl.out) == ssl, "(k) is (c) but for its pool"
        for name in ("ft_ssl_tpool", "ft_poolbn_tpool"):
            assert stages[f"eval_{name}.s1"].parent_path == str(stages[f"{name}.s1"].folder)
            assert not stages[f"eval_{name}.s1"].adapt_bn
        # MKD: the Dubai hop runs once for every seed; each seed's Nairobi head starts from that one student
        assert [s.name for s in plan.stages if s.name.startswith("dubai_")] == ["dubai_teacher", "dubai_student",
                                                                                "dubai_ft"]
        assert stages["mkd_teacher.s2"].config.parent == str(tmp_path / target / "dubai_student")
        assert stages["mkdft_teacher.s2"].config.parent == str(tmp_path / target / "dubai_ft")
        assert stages["mkdft.s2"].config.options.init_from_teacher
        assert stages["skd_teacher.s2"].config.parent is None or "dubai" not in stages["skd_teacher.s2"].config.parent
    labels = [s.spec.label for s in plan.stages if s.kind == "eval" and s.name.endswith(".s0")]
    assert labels[0] == plan.recipe.baseline == "(a) fine-tune"
    assert any("control" in label for label in labels) and any("MKD" in label for label in labels)


def test_oam_transfer_splits_the_real_data_as_documented(tmp_path):
    """The protocol's counts, planned from the file names alone (no image is read)."""
    if not (SHARED / "oam_buildings").is_dir() or not (SHARED / "dubai_aerial").is_dir():
        pytest.skip(f"real data not available under {SHARED}")
    recipe = next(p for p in RECIPES if p.stem == "oam_transfer")
    plan = build_plan(load_recipe(recipe, {"DATA": str(SHARED)}, out=str(tmp_path / "run")), recipe)
    assert not plan.warnings
    source, target = plan.recipe.datasets["nairobi"].shard, plan.recipe.datasets["target"].shard
    names = sorted(p.name for p in Path(source.images).iterdir())
    nairobi = [n for n in names if source.include_pattern().search(n)]
    kampala = [n for n in names if target.include_pattern().search(n)]
    assert (len(nairobi), len(kampala)) == (504, 147)
    split = strip_splits({n: strip_extent(n, source.strip_pattern()) for n in nairobi}, parse_ratio(source.split))
    train = [n.rsplit(".", 1)[0] for n in nairobi if split[n] == "train"]
    assert (len(train), sum(v == "val" for v in split.values())) == (420, 84)
    assert len(labeled_subset(train, source.labeled_fraction, source.seed)) == 42
