"""Bad stage inputs fail fast with one clear line, exit status 2, and leave existing run folders untouched."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_MODEL, launch, tiny_stage_config


@pytest.fixture(scope="module")
def finished_head(tmp_path_factory, target_shards, init_weights):
    tmp = tmp_path_factory.mktemp("head")
    cfg = tiny_stage_config(tmp, steps=2, ckpt_every=1, fisher_batches=0)
    launch("finetune_head.py", "--config", str(cfg), "--data", str(target_shards), "--parent", str(init_weights),
           "--out", str(tmp / "head"))
    return tmp / "head"


def _fails(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), proc.stderr[-2000:]


def _snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_teacher_with_other_classes_needs_a_head_stage(tmp_path, target_shards):
    from distseg.data.synthetic import class_map_dict
    from distseg.engine.checkpoint import stage_record, write_json_atomic
    from distseg.models import ModelConfig, build_model
    from distseg.models.weights import save_weights

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    mcfg = dict(TINY_MODEL, num_classes=8)
    save_weights(build_model(ModelConfig(**mcfg)), teacher / "model.safetensors")
    record = stage_record("distill", {"model": mcfg}, class_map_dict("intermediate"), None)
    write_json_atomic(teacher / "stage.json", dict(record, finished=True))
    proc = launch("distill.py", "--config", str(tiny_stage_config(tmp_path)), "--data", str(target_shards),
                  "--teacher", str(teacher), "--out", str(tmp_path / "out"), check=False)
    _fails(proc, "head stage")
    assert not (tmp_path / "out").exists()


def test_missing_teacher_folder(tmp_path, target_shards):
    proc = launch("distill.py", "--config", str(tiny_stage_config(tmp_path)), "--data", str(target_shards),
                  "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), check=False)
    _fails(proc, "nope", "not found")


def test_global_batch_that_does_not_divide(tmp_path, target_shards, finished_head):
    proc = launch("distill.py", "--config", str(tiny_stage_config(tmp_path)), "--data", str(target_shards),
                  "--teacher", str(finished_head), "--out", str(tmp_path / "out"), "--global-batch", "6",
                  "--micro-batch", "4", check=False)
    _fails(proc, "6", "4")
    assert not (tmp_path / "out").exists()


def test_existing_run_is_not_overwritten(tmp_path, target_shards, finished_head, init_weights):
    before = _snapshot(finished_head)
    proc = launch("finetune_head.py", "--config", str(tiny_stage_config(tmp_path, steps=2, ckpt_every=1,
                                                                         fisher_batches=0)),
                  "--data", str(target_shards), "--parent", str(init_weights), "--out", str(finished_head),
                  check=False)
    _fails(proc, "--resume")
    assert _snapshot(finished_head) == before


def test_corrupt_checkpoints_fall_back_then_are_refused(tmp_path, target_shards, finished_head, init_weights):
    import shutil

    import yaml

    from distseg.folders import LOCK_NAME

    def copy_with_config(name):
        run = tmp_path / name
        shutil.copytree(finished_head, run)
        stage = json.loads((run / "stage.json").read_text())["config"]
        stage.pop("ds_config_resolved")
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({k: v for k, v in stage.items() if k not in ("kind",)}))
        return run, config

    def truncate(tag_dir):
        path = tag_dir / "mp_rank_00_model_states.pt"
        path.write_bytes(path.read_bytes()[:100])

    run, config = copy_with_config("newest_bad")
    tags = sorted((run / "checkpoint").glob("step*"))
    truncate(tags[-1])
    proc = launch("finetune_head.py", "--config", str(config), "--out", str(run), "--resume")
    assert f"warning: not resuming from {tags[-1].name}" in proc.stdout and "mp_rank_00_model_states.pt" in proc.stdout
    assert f"resumed {run} at step 1" in proc.stdout and json.loads((run / "stage.json").read_text())["finished"]
    run, config = copy_with_config("all_bad")
    for tag in (run / "checkpoint").glob("step*"):
        truncate(tag)
    before = {k: v for k, v in _snapshot(run).items() if k.name != LOCK_NAME}
    proc = launch("finetune_head.py", "--config", str(config), "--out", str(run), "--resume", check=False)
    _fails(proc, "no usable checkpoint", "mp_rank_00_model_states.pt")
    assert {k: v for k, v in _snapshot(run).items() if k.name != LOCK_NAME} == before


def test_fisher_command_covers_every_parameter(finished_head, target_shards):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from distseg.cli import app
    from distseg.fisher import load_fisher

    result = CliRunner().invoke(app, ["fisher", str(finished_head), "--batches", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    state = load_fisher(finished_head / "fisher.safetensors")
    weights = load_file(str(finished_head / "model.safetensors"))
    params = {k for k in weights if "running_" not in k and "num_batches" not in k}
    assert set(state.fisher) == params  # the whole network, though the head stage trained only its classifier
    assert all((f >= 0).all() for f in state.fisher.values()) and any((f > 0).any() for f in state.fisher.values())
    assert all(torch.equal(state.anchor[k], weights[k]) for k in params)
    bad = CliRunner().invoke(app, ["fisher", str(finished_head.parent / "missing")])
    assert bad.exit_code == 2 and "missing" in bad.output

