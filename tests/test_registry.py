"""The stage registry is the one list of kinds: launchers, configs, recipes and bench derive from it, and a task's
step runs in-process on a CPU batch."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_MODEL
from distseg.config import ConfigError, from_dict, to_dict
from distseg.data.batch import Batch, Batches
from distseg.data.classes import ClassMap
from distseg.engine.distributed import DistEnv
from distseg.stages.common import Parent
from distseg.stages.config import StageConfig
from distseg.stages.registry import MODULES, all_kinds, get_kind, kind_names
from distseg.stages.task import StageContext


def test_every_registered_kind_loads_and_every_launch_script_is_a_kind():
    kinds = all_kinds()
    assert [k.name for k in kinds] == kind_names() == list(MODULES)
    scripts = {p.name for p in (REPO / "launch").glob("*.py")}
    assert scripts == {k.script for k in kinds if k.script}
    for kind in kinds:
        if kind.script:
            text = (REPO / "launch" / kind.script).read_text()
            assert re.search(rf'main\("{kind.name}"', text), kind.script
    with pytest.raises(KeyError, match="unknown stage kind 'nope'; registered: \\['head'"):
        get_kind("nope")


def test_config_names_the_unknown_kind_with_the_lookup_wording():
    from distseg.config import ConfigError
    from distseg.stages.config import StageConfig

    with pytest.raises(ConfigError, match=r"^stages\[2\]\.kind: unknown stage kind 'nope'; registered: \['head'"):
        StageConfig.from_mapping({"kind": "nope"}, "stages[2]")


def test_unknown_backbone_lists_the_registered_keys_sorted():
    from distseg.models.backbones import BACKBONES, get_spec

    with pytest.raises(KeyError, match=re.escape(f"unknown backbone 'nope'; registered: {sorted(BACKBONES)}")):
        get_spec("nope")


def test_module_help_lists_every_kind():
    out = subprocess.run([sys.executable, "-m", "distseg.stages", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0
    for name in kind_names():
        assert f"  {name} " in out.stdout, name
    bad = subprocess.run([sys.executable, "-m", "distseg.stages", "nope"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert bad.returncode == 2 and "unknown stage kind 'nope'" in bad.stderr


@pytest.mark.parametrize("kind", [k for k in kind_names() if get_kind(k).trains])
def test_config_round_trip_spells_options_under_the_kind(kind):
    spec = get_kind(kind)
    data = {"kind": kind, "parent": "p" if spec.parent != "none" else None, "model": {"pretrained": "imagenet"}}
    cfg = from_dict(StageConfig, data)
    again = from_dict(StageConfig, to_dict(cfg))
    assert again == cfg and "options" not in to_dict(cfg)
    assert (kind in to_dict(cfg)) == (spec.options is not None)
    other = next(k for k in kind_names() if k != kind and get_kind(k).options is not None)
    with pytest.raises(ConfigError, match="'eval' is not a training kind"):
        from_dict(StageConfig, {**data, "kind": "eval", "parent": "p"})
    with pytest.raises(ConfigError, match=f"do not apply to a {kind} stage"):
        from_dict(StageConfig, {**data, other: {}})


def test_parent_rules_come_from_the_kind():
    with pytest.raises(ConfigError, match="needs a parent stage"):
        from_dict(StageConfig, {"kind": "distill"})
    cfg = from_dict(StageConfig, {"kind": "finetune"})
    with pytest.raises(ValueError, match="needs a parent .* or model.pretrained"):
        get_kind("finetune").check(cfg)


def _ctx(kind: str, parent: Parent, **options) -> StageContext:
    """A context as the trainer makes it, with an in-memory parent and a three-class map."""
    spec = get_kind(kind)
    data = {"kind": kind, "model": TINY_MODEL, "parent": "in-memory", "loss": {"kind": "ce"}}
    if spec.options:
        data[kind] = options
    classes = ClassMap.from_dict({"classes": [{"name": n, "value": i} for i, n in enumerate("abc")]})
    return StageContext(kind=spec, cfg=from_dict(StageConfig, data), env=DistEnv(0, 0, 1, torch.device("cpu")),
                        class_map=classes, parent=parent)


def _batch(b: int = 2, size: int = 32, strong: bool = False) -> Batch:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(b, 3, size, size, generator=g)
    return Batch(key=[str(i) for i in range(b)], image=image, mask=torch.randint(0, 3, (b, size, size), generator=g),
                 image_strong=image.flip(-1) if strong else None)


@pytest.mark.parametrize("kind, options", [("distill", {"ewc_lambda": 0.0}), ("ssl", {"tau": 0.0}), ("head", {}),
                                           ("ssl", {"tau": 0.0, "feature_dropout": 0.5}),
                                           ("ssl", {"tau": 0.0, "adaptive_tau": True}),
                                           ("ssl", {"tau": 0.0, "source_mix": 1.0, "consistency": "kl"}),
                                           ("ssl", {"tau": 0.0, "bn_stats": "pool"})])
def test_a_task_step_runs_in_process_on_a_cpu_batch(kind, options):
    from distseg.models import ModelConfig

    torch.manual_seed(0)
    parent = Parent(model_cfg=ModelConfig(**TINY_MODEL, num_classes=3), weights=None, class_map=None)
    spec = get_kind(kind)
    task = spec.task(_ctx(kind, parent, **options))
    student = task.build()
    task.bind(student.module)  # a plain module stands in for the DeepSpeed engine
    unl = Batch(key=["u0", "u1"], image=_batch().image, image_strong=_batch().image.flip(-1)) if spec.unlabelled \
        else None
    losses = task.step(Batches(labelled=_batch(), unlabelled=unl))
    assert losses["loss"].requires_grad and torch.isfinite(losses["loss"])
    assert {"sup"} <= set(losses) and all(not v.requires_grad for k, v in losses.items() if k != "loss")
    if kind == "distill":
        assert "kd" in losses and "ewc" not in losses
    if kind == "ssl":
        assert losses["kept_fraction"] == 1.0 and "cons" in losses
        assert ("cons_fp" in losses) == (options.get("feature_dropout", 0) > 0)
        assert ("class_tau" in losses) == options.get("adaptive_tau", False)
        assert ("pasted_fraction" in losses) == (options.get("source_mix", 0) > 0)
        if "pasted_fraction" in losses:  # one of the two minority classes of a uniform random 3-class mask: ~1/3
            assert 0.2 < float(losses["pasted_fraction"]) < 0.45
    losses["loss"].backward()
    trained = {id(p) for p in student.params}
    assert all((p.grad is not None) == (id(p) in trained) for p in student.module.parameters())


def test_adaptive_thresholds_follow_the_teacher_and_survive_a_checkpoint(tmp_path):
    """The SSL task's per-class τ comes from its teacher's confidence on the batch, reaches the loss dict, and
    its stage state carries it into a resumed task."""
    from distseg.models import ModelConfig
    from distseg.ops.pseudo import tta_probs

    torch.manual_seed(0)
    parent = Parent(model_cfg=ModelConfig(**TINY_MODEL, num_classes=3), weights=None, class_map=None)
    tasks = []
    for _ in range(2):
        task = get_kind("ssl").task(_ctx("ssl", parent, tau=0.9, adaptive_tau=True))
        task.bind(task.build().module)
        tasks.append(task)
    task, resumed = tasks
    unl = Batch(key=["u0", "u1"], image=_batch().image, image_strong=_batch().image.flip(-1))
    losses = task.step(Batches(labelled=_batch(), unlabelled=unl))
    probs = tta_probs(task.teacher, unl.image, task.options.tta, task.options.brightness)
    confidence, label = probs.max(1)
    sigma = torch.tensor([confidence[label == c].mean() if (label == c).any() else 1.0 for c in range(3)])
    torch.testing.assert_close(losses["class_tau"], 0.9 * sigma / sigma.max(), rtol=1e-5, atol=1e-6)
    task.state.save(tmp_path)
    resumed.state.load(tmp_path)
    assert torch.equal(resumed.thresholds.sigma, task.thresholds.sigma)


def test_a_new_kind_is_one_file_and_one_registration_line(tmp_path, target_shards, init_weights):
    """tests/kinds/linear_probe.py plus ``MODULES[...] = ...`` runs as a stage through the module launcher."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import REPO, stage_env, tiny_stage_config

    register = (f"import sys; sys.path.insert(0, {str(REPO / 'tests' / 'kinds')!r}); "
                "from distseg.stages import registry; registry.MODULES['linear_probe'] = 'linear_probe'; "
                "from distseg.stages.__main__ import main; main()")
    out = tmp_path / "probe"
    run = subprocess.run([sys.executable, "-c", register, "linear_probe", "--config", str(tiny_stage_config(tmp_path)),
                          "--data", str(target_shards), "--parent", str(init_weights), "--out", str(out)],
                         capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((out / "stage.json").read_text())
    assert record["kind"] == "linear_probe" and record["finished"]
    start, probe = load_file(init_weights), load_file(out / "model.safetensors")
    changed = {k for k in probe if k in start and not torch.equal(start[k], probe[k])}
    assert changed and all(k.startswith("classifier.") for k in changed), sorted(changed)  # only the classifier


def test_a_kind_with_an_ema_copy_is_one_file_and_one_registration_line(tmp_path, target_shards, init_weights):
    """tests/kinds/ema_finetune.py declares its EMA copy once; the stage state checkpoints it, counts its updates,
    validates it beside the student, checks it across ranks and exports it as the deployed model."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import REPO, stage_env, tiny_stage_config
    from distseg.engine.checkpoint import safe_load

    register = (f"import sys; sys.path.insert(0, {str(REPO / 'tests' / 'kinds')!r}); "
                "from distseg.stages import registry; registry.MODULES['ema_finetune'] = 'ema_finetune'; "
                "from distseg.stages.__main__ import main; main()")
    out = tmp_path / "ema"
    config = tiny_stage_config(tmp_path, steps=4, ckpt_every=2, eval_every=2)
    run = subprocess.run([sys.executable, "-c", register, "ema_finetune", "--config", str(config),
                          "--data", str(target_shards), "--parent", str(init_weights), "--out", str(out)],
                         capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((out / "stage.json").read_text())
    assert record["finished"] and set(record["rank_divergence"]) == {"student", "ema"}
    assert set(record["metrics"]) >= {"score", "ema", "student"}
    assert record["metrics"]["score"] == (record["metrics"]["ema"]["miou"] or 0.0)
    tag = out / "checkpoint" / "step00000004"
    assert (tag / "ema.safetensors").is_file()
    assert int(safe_load(tag / "task_state.pt")["ema"]["ema"]["num_updates"]) == 4
    deployed, student = load_file(out / "last" / "model.safetensors"), load_file(out / "last" / "student.safetensors")
    saved = load_file(tag / "ema.safetensors")
    assert all(torch.equal(deployed[k], saved[k]) for k in saved)  # the export is the EMA copy...
    assert any(not torch.equal(deployed[k], student[k]) for k in student if deployed[k].is_floating_point())  # not the student


def test_the_class_balance_guard_rail_reaches_the_loss_dict_and_the_checkpoint(tmp_path):
    """With ssl.balance_bound the pseudo-labels' class share is tracked against the labelled share (from the
    manifest the trainer opened), logged, damps λ_u once a class drifts, and is carried by the stage state."""
    from types import SimpleNamespace

    from distseg.models import ModelConfig

    torch.manual_seed(0)
    parent = Parent(model_cfg=ModelConfig(**TINY_MODEL, num_classes=3), weights=None, class_map=None)
    manifest = {"splits": {"train": {"class_pixels": {"a": 98, "b": 1, "c": 1}}}}
    tasks = []
    for _ in range(2):
        ctx = _ctx("ssl", parent, tau=0.0, balance_bound=2.0, balance_momentum=0.0)
        ctx.data = SimpleNamespace(manifest=manifest)
        task = get_kind("ssl").task(ctx)
        task.bind(task.build().module)
        tasks.append(task)
    task, resumed = tasks
    unl = Batch(key=["u0", "u1"], image=_batch().image, image_strong=_batch().image.flip(-1))
    losses = task.step(Batches(labelled=_batch(), unlabelled=unl))
    hist = task.pseudo_targets(unl).pseudo.class_hist.float()
    share = hist / hist.sum()
    target = torch.tensor([0.98, 0.01, 0.01])
    ratio = share.clamp_min(1e-6) / target
    torch.testing.assert_close(losses["class_share_ratio"], ratio)
    worst = torch.maximum(ratio, 1 / ratio).max()
    torch.testing.assert_close(losses["balance_damping"], (2.0 / worst).clamp(max=1.0))
    assert float(losses["balance_damping"]) < 1.0  # a random tiny model is far from 98 % class a
    task.state.save(tmp_path)
    resumed.state.load(tmp_path)
    assert torch.equal(resumed.balance.share, task.balance.share)


@pytest.mark.parametrize("by_source", [True, False])
def test_the_guard_rail_tracks_each_pool_folder_on_its_own(by_source):
    """With a pool of two folders the rail keeps one share per folder, fed by the pixels of that folder's samples
    (CutMix boxes carry their sample's folder), logs one ratio per folder by name and damps by the worst; with
    balance_by_source off it keeps one share over the pool, as before."""
    import dataclasses
    from types import SimpleNamespace

    from distseg.models import ModelConfig

    torch.manual_seed(0)
    parent = Parent(model_cfg=ModelConfig(**TINY_MODEL, num_classes=3), weights=None, class_map=None)
    ctx = _ctx("ssl", parent, tau=0.0, balance_bound=2.0, balance_momentum=0.0, balance_by_source=by_source)
    ctx.cfg.data = dataclasses.replace(ctx.cfg.data, unlabeled=["runs/x/nairobi", "runs/x/target_pool"])
    ctx.data = SimpleNamespace(manifest={"splits": {"train": {"class_pixels": {"a": 60, "b": 30, "c": 10}}}})
    task = get_kind("ssl").task(ctx)
    task.bind(task.build().module)
    image = _batch(b=4).image
    box = torch.zeros(4, 32, 32, dtype=torch.bool)
    box[1, :8, :8] = True
    unl = Batch(key=list("wxyz"), image=image, image_strong=image.flip(-1), source=torch.tensor([0, 1, 1, 0]),
                cutmix_box=box, cutmix_index=torch.tensor([3, 0, 1, 2]))
    t = task.pseudo_targets(unl)
    losses = task.step(Batches(labelled=_batch(), unlabelled=unl))
    pl, target = t.pseudo, torch.tensor([0.6, 0.3, 0.1])
    groups = [[0, 3], [1, 2]] if by_source else [[0, 1, 2, 3]]
    ratios = []
    for rows in groups:
        hist = torch.stack([((pl.labels[rows] == c) & pl.keep[rows]).sum() for c in range(3)]).float()
        ratios.append((hist / hist.sum()).clamp_min(1e-6) / target)
    if by_source:
        assert task.sources == ["nairobi", "target_pool"]
        torch.testing.assert_close(losses["class_share_ratio/nairobi"], ratios[0])
        torch.testing.assert_close(losses["class_share_ratio/target_pool"], ratios[1])
        assert t.source[1, 0, 0] == 0 and t.source[1, 20, 20] == 1, "the pasted box is sample 0's, from nairobi"
    else:
        assert "class_share_ratio/nairobi" not in losses
        torch.testing.assert_close(losses["class_share_ratio"], ratios[0])
    worst = max(float(torch.maximum(r, 1 / r).max()) for r in ratios)
    assert float(losses["balance_damping"]) == pytest.approx(min(1.0, 2.0 / worst), rel=1e-5)


@pytest.mark.parametrize("lambda_u", [1.0, 0.0])
def test_bn_stats_pool_makes_the_running_statistics_follow_the_pool_alone(lambda_u):
    """With ssl.bn_stats=pool the student's BN running statistics after a step are exactly those of one train-mode
    forward on the pool's weak views (the labelled and strong forwards leave them alone), for the λ_u = 0 control
    too, which then reads the pool for them."""
    import copy

    from distseg.models import ModelConfig

    torch.manual_seed(0)
    parent = Parent(model_cfg=ModelConfig(**TINY_MODEL, num_classes=3), weights=None, class_map=None)
    task = get_kind("ssl").task(_ctx("ssl", parent, tau=0.0, bn_stats="pool", lambda_u=lambda_u))
    student = task.build()
    task.bind(student.module)
    assert "unlabelled" in task.streams()
    for m in student.module.modules():  # dropout draws would make the two decoders' inputs differ
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    reference = copy.deepcopy(student.module).train()
    pool = _batch().image * 0.2 + 0.8  # brighter than the labelled batch: other statistics
    task.step(Batches(labelled=_batch(), unlabelled=Batch(key=["u0", "u1"], image=pool, image_strong=pool.flip(-1))))
    with torch.no_grad():
        reference(pool)
    buffers = dict(reference.named_buffers())
    stats = {n: b for n, b in student.module.named_buffers() if n.endswith(("running_mean", "running_var"))}
    assert stats and all(torch.equal(b, buffers[n]) for n, b in stats.items())  # (num_batches_tracked counts all)
