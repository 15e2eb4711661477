"""The ddpm and ddpm_head stage kinds: in-process task steps, and real stage runs (2 ranks, resume, export round trip
through evaluate, predict and bench infer)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, kill_after_checkpoint, launch, stage_record
from distseg.config import from_dict
from distseg.data.batch import Batch, Batches
from distseg.data.classes import ClassMap
from distseg.engine.distributed import DistEnv
from distseg.models.denoiser import DenoiserConfig, build_denoiser
from distseg.models.weights import save_weights
from distseg.stages.common import Parent, StageError
from distseg.stages.config import StageConfig
from distseg.stages.registry import get_kind
from distseg.stages.task import StageContext

DENOISER = {"image_size": 32, "channels": [16, 32, 32], "layers_per_block": 1, "attention": [False, False, True],
            "norm_groups": 8, "attention_head_dim": 16, "schedule": {"timesteps": 100}}
EXTRACTOR = {"timesteps": [5, 50], "blocks": [1, 2, 4]}
HEAD = {"hidden": 16, "blocks": 1, "gate_reduction": 4}
CPU = DistEnv(0, 0, 1, torch.device("cpu"))


def _smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Low-frequency colour fields: images with structure a tiny denoiser can learn in a few dozen steps."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _context(kind: str, options: dict, parent: Parent | None = None, class_map: ClassMap | None = None):
    cfg = from_dict(StageConfig, {"kind": kind, "parent": "in-memory" if parent else None, kind: options,
                                  "loss": {"kind": "ce"}})
    return StageContext(kind=get_kind(kind), cfg=cfg, env=CPU, class_map=class_map, parent=parent)


def _denoising_loss(unet, images: torch.Tensor, scheduler) -> float:
    """MSE of the noise prediction on a fixed draw of noise and steps (the same draw before and after training)."""
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(0, 100, (images.shape[0],), generator=g)
    with torch.no_grad():
        predicted = unet(scheduler.add_noise(images * 2 - 1, noise, t), t, return_dict=False)[0]
    return torch.nn.functional.mse_loss(predicted, noise).item()


def test_tiny_ddpm_denoising_loss_falls_on_cpu():
    torch.manual_seed(0)
    task = get_kind("ddpm").task(_context("ddpm", {"denoiser": DENOISER, "ema": None}))
    student = task.build()
    task.bind(student.module)  # a plain module stands in for the DeepSpeed engine
    images = _smooth_images(16)
    before = _denoising_loss(task.student, images, task.scheduler)
    opt = torch.optim.AdamW(student.params, lr=3e-3)
    for _ in range(40):
        losses = task.step(Batches(unlabelled=Batch(key=[str(i) for i in range(16)], image=images)))
        assert set(losses) == {"loss", "mse"} and not losses["mse"].requires_grad
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        task.state.after_step(True)
    after = _denoising_loss(task.student, images, task.scheduler)
    assert after < 0.6 * before, (before, after)


def _classes(n: int = 3) -> ClassMap:
    return ClassMap.from_dict({"classes": [{"name": f"c{i}", "value": i} for i in range(n)]})


@pytest.fixture(scope="module")
def denoiser_parent(tmp_path_factory) -> Parent:
    torch.manual_seed(1)
    cfg = from_dict(DenoiserConfig, DENOISER)
    path = tmp_path_factory.mktemp("ddpm") / "model.safetensors"
    save_weights(build_denoiser(cfg), path)
    return Parent(model_cfg=cfg, weights=path, class_map=None, folder=path.parent)


def test_ddpm_head_step_trains_only_the_head_on_the_parents_weights(denoiser_parent):
    torch.manual_seed(0)
    task = get_kind("ddpm_head").task(_context("ddpm_head", {"extractor": EXTRACTOR, "head": HEAD},
                                               denoiser_parent, _classes()))
    student = task.build()
    task.bind(student.module)
    parent_weights = load_file(str(denoiser_parent.weights))
    assert all(torch.equal(v, parent_weights[k]) for k, v in student.module.features.unet.state_dict().items())
    assert {id(p) for p in student.params} == {id(p) for p in student.module.head.parameters()}
    assert student.model_cfg.architecture == "ddpm_head" and student.model_cfg.denoiser == denoiser_parent.model_cfg
    batch = Batch(key=["a", "b"], image=_smooth_images(2, 32), mask=torch.randint(0, 3, (2, 32, 32)))
    losses = task.step(Batches(labelled=batch))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and all(p.grad is None for p in student.module.features.parameters())
    assert task.record()["features"]["channels"] == (32 + 32 + 16) * 2  # blocks 1, 2 (32 ch) and 4 (16 ch), 2 t


def test_random_extractor_is_the_untrained_control(denoiser_parent):
    torch.manual_seed(0)
    task = get_kind("ddpm_head").task(_context("ddpm_head", {"extractor": EXTRACTOR, "head": HEAD,
                                                             "random_extractor": True}, denoiser_parent, _classes()))
    unet = task.build().module.features.unet
    parent_weights = load_file(str(denoiser_parent.weights))
    assert not any(torch.equal(v, parent_weights[k]) for k, v in unet.state_dict().items() if k.endswith("weight")
                   and v.dim() == 4)


@pytest.mark.parametrize("extractor, message", [
    ({"timesteps": [5, 100]}, r"timesteps \[100\] are outside the denoiser's schedule"),
    ({"blocks": [1, 6]}, r"blocks \[6\]: unknown decoder block"),
])
def test_ddpm_head_refuses_steps_and_blocks_the_parent_lacks(denoiser_parent, extractor, message):
    task = get_kind("ddpm_head").task(_context("ddpm_head", {"extractor": {**EXTRACTOR, **extractor}},
                                               denoiser_parent, _classes()))
    with pytest.raises(StageError, match=message):
        task.build()


def test_ddpm_head_needs_a_ddpm_parent_and_deeplab_kinds_refuse_one(denoiser_parent, tmp_path):
    from conftest import TINY_MODEL
    from distseg.models import ModelConfig

    deeplab = Parent(model_cfg=ModelConfig(**TINY_MODEL, num_classes=3), weights=tmp_path / "w", class_map=None,
                     folder=tmp_path)
    with pytest.raises(StageError, match="needs a finished ddpm stage folder"):
        get_kind("ddpm_head").task(_context("ddpm_head", {}, deeplab, _classes())).build()
    with pytest.raises(StageError, match="the parent is a ddpm_unet model"):
        get_kind("ssl").task(_context("ssl", {}, denoiser_parent, _classes())).build()


# ---- real stage runs -----------------------------------------------------------------------------------------


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _stage_config(tmp: Path, kind: str, options: dict, **train) -> Path:
    return _write(tmp / f"{kind}.yaml", {
        "data": {"stream": {"num_workers": 0, "shuffle_buffer": 16, "augment": {"crop_size": 32}}},
        "train": {"steps": 4, "log_every": 2, "fisher_batches": 0, "eval_batch_size": 4, **train},
        "optim": {"name": "adamw", "lr": 2e-3}, "loss": {"kind": "ce"}, kind: options})



def _ddpm_options(**extra) -> dict:
    return {"denoiser": DENOISER, "ema": {"alpha": 0.9, "warmup_steps": 0}, "samples": 4, "sample_steps": 3, **extra}


@pytest.fixture(scope="module")
def tiled_shards(tmp_path_factory) -> Path:
    """Synthetic target-domain scenes cut into 64-px tiles (the UNet takes sides that divide by 4)."""
    from distseg.data.shard import shard_dataset
    from distseg.data.synthetic import write_dataset

    tmp = tmp_path_factory.mktemp("tiled")
    raw = write_dataset(tmp / "raw", 16, size=(64, 128), domain="target", seed=0, n_unlabeled=8)
    shard_dataset(tmp / "shards", images=raw / "images", masks=raw / "masks", unlabeled=raw / "unlabeled",
                  classes=raw / "classes.yaml", split="6:1:1", seed=0, shard_size=8, tile=64, force=True)
    return tmp / "shards"


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory, tiled_shards) -> Path:
    """A 2-process `deepspeed --num_gpus 2` ddpm stage with ZeRO-1 on gloo."""
    tmp = tmp_path_factory.mktemp("ddpm_run")
    cfg = _stage_config(tmp, "ddpm", _ddpm_options(), steps=4, ckpt_every=2)
    launch("ddpm.py", "--config", str(cfg), "--data", str(tiled_shards), "--ds_config", "ds_configs/zero1_fp32.json",
           "--out", str(tmp / "ddpm"), nproc=2)
    return tmp / "ddpm"


@pytest.fixture(scope="module")
def head_run(tmp_path_factory, tiled_shards, ddpm_run) -> Path:
    tmp = tmp_path_factory.mktemp("head_run")
    cfg = _stage_config(tmp, "ddpm_head", {"extractor": EXTRACTOR, "head": HEAD}, steps=4, eval_every=2)
    launch("ddpm_head.py", "--config", str(cfg), "--data", str(tiled_shards), "--parent", str(ddpm_run),
           "--out", str(tmp / "head"))
    return tmp / "head"


@pytest.mark.slow
def test_ddpm_stage_two_ranks_agree_and_draw_a_sample_grid(ddpm_run):
    record = stage_record(ddpm_run)
    assert record["finished"] and record["world_size"] == 2 and record["steps"] == 4
    assert set(record["rank_divergence"]) == {"student", "ema"} and all(
        v == 0.0 for v in record["rank_divergence"].values()), record["rank_divergence"]
    assert record["config"]["model"]["architecture"] == "ddpm_unet" and record["class_map"] is None
    logged = [json.loads(line) for line in (ddpm_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "mse" in m] == [2, 4] and all(m["mse"] > 0 for m in logged if "mse" in m)
    grid = np.asarray(Image.open(ddpm_run / "samples.png"))
    assert grid.shape == (2 + 2 * (32 + 2), 2 + 2 * (32 + 2), 3) and grid.std() > 0  # 2×2 samples of 32 px
    ema, student = load_file(str(ddpm_run / "model.safetensors")), load_file(str(ddpm_run / "student.safetensors"))
    assert ema.keys() == student.keys() and any(not torch.equal(ema[k], student[k]) for k in ema)
    build_denoiser(from_dict(DenoiserConfig, record["config"]["model"])).load_state_dict(ema)


@pytest.mark.slow
def test_exported_head_round_trips_through_evaluate_predict_and_bench(head_run, tiled_shards, tmp_path):
    from typer.testing import CliRunner

    from distseg.bench.records import read_records
    from distseg.cli import app
    from distseg.engine.checkpoint import load_inference_model

    record = stage_record(head_run)
    assert record["finished"] and record["config"]["model"]["architecture"] == "ddpm_head"
    assert record["features"]["size"] == [32, 32]
    launch("evaluate.py", str(head_run), "--data", str(tiled_shards), "--split", "val", "--tile", "32",
           "--out", str(tmp_path))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["best_val"]["whole_tile"]["confusion"] == record["metrics"]["student"]["confusion"]
    assert result["sliding_window"]["miou"] is not None
    # predict: one window covering the whole image equals the loaded model's own forward
    model, class_map = load_inference_model(head_run)
    image = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "tile.png")
    runner = CliRunner()
    out = runner.invoke(app, ["predict", str(head_run), str(tmp_path / "tile.png"), "--out", str(tmp_path / "pred"),
                              "--tile", "96", "--overlap", "0", "--quiet", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    with torch.no_grad():
        expected = model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).argmax(1)[0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pred" / "tile_mask.png")), expected)
    bad = runner.invoke(app, ["predict", str(head_run), str(tmp_path / "tile.png"), "--out", str(tmp_path / "p2"),
                              "--tile", "30", "--quiet", "--device", "cpu"])
    assert bad.exit_code == 2 and "error: input 30×30" in bad.output and "multiples of 4" in bad.output
    assert not (tmp_path / "p2").exists() or not any((tmp_path / "p2").iterdir())
    bench = runner.invoke(app, ["bench", "infer", "--model", str(head_run / "stage.json"), "--size", "32", "--batch",
                                "2", "--iters", "1", "--warmup", "1", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert bench.exit_code == 0, bench.output
    (row,) = read_records([tmp_path])
    assert row["images_per_s"] > 0 and row["backbone"].startswith("ddpm_head") and row["flops_per_step"] > 0


@pytest.mark.slow
def test_ddpm_resume_after_kill_matches_uninterrupted_run(tmp_path, tiled_shards):
    cfg = _stage_config(tmp_path, "ddpm", _ddpm_options(samples=0), steps=10, ckpt_every=2)
    args = ["--config", str(cfg), "--data", str(tiled_shards)]
    launch("ddpm.py", *args, "--out", str(tmp_path / "straight"))
    killed = tmp_path / "killed"
    kill_after_checkpoint([sys.executable, str(REPO / "launch" / "ddpm.py"), *args, "--out", str(killed)], killed)
    launch("ddpm.py", *args, "--out", str(killed), "--resume")
    assert stage_record(killed)["finished"] and stage_record(killed)["steps"] == 10
    for name in ("model.safetensors", "student.safetensors"):  # the EMA and the trained weights
        straight, resumed = load_file(str(tmp_path / "straight" / name)), load_file(str(killed / name))
        assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6, name


@pytest.mark.parametrize("sets, message", [
    (["ddpm_head.extractor.timesteps=[5,100]"], "outside the denoiser's schedule"),
    (["ddpm_head.extractor.blocks=[9]"], "unknown decoder block"),
    (["data.stream.augment.crop_size=30"], "data.stream.augment.crop_size 30×30: this UNet (3 levels) takes sides"),
])
def test_head_stage_bad_options_are_one_line_and_leave_nothing(tmp_path, tiled_shards, denoiser_parent, sets,
                                                                message):
    folder = tmp_path / "ddpm"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(Path(denoiser_parent.weights).read_bytes())
    (folder / "stage.json").write_text(json.dumps({"kind": "ddpm", "finished": True, "class_map": None,
                                                   "config": {"model": {"architecture": "ddpm_unet", **DENOISER}}}))
    cfg = _stage_config(tmp_path, "ddpm_head", {"extractor": EXTRACTOR, "head": HEAD})
    proc = launch("ddpm_head.py", "--config", str(cfg), "--data", str(tiled_shards), "--parent", str(folder),
                  "--out", str(tmp_path / "out"), *[a for s in sets for a in ("--set", s)], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert (str(folder) in lines[-1] or "crop_size" in message) and not (tmp_path / "out").exists()
