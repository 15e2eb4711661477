"""The error contract: every failure that is the input's or the machine's (an unwritable, misplaced or full output
folder, a decompression bomb, a damaged checkpoint or Fisher, a bad sample in a loader worker) is one ``error:``
line and exit status 2 with nothing partial left, a damaged newest checkpoint falls back to an older one, and
YAML 1.2 numbers parse everywhere."""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import REPO, launch, stage_env, tiny_stage_config
from distseg.cli import app
from distseg.data.synthetic import write_dataset
from distseg.folders import LOCK_NAME


def one_error_line(code: int, stderr: str, *needles: str) -> str:
    """Exit status 2 and exactly one ``error:`` line holding every needle; returns that line."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A 2 KB greyscale PNG whose header claims side² pixels (only a few rows of data follow)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1)
                                                                                                  * 8, 9))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "src", 4, 32, seed=0)


def shard_cli(src: Path, out: Path, *extra: str):
    args = ["shard-data", str(out), "--images", str(src / "images"), "--masks", str(src / "masks"),
            "--classes", str(src / "classes.yaml"), "--split", "1:0:0", *extra]
    return CliRunner().invoke(app, args)


def no_partials(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if ".partial" in p.name], sorted(p.name for p in parent.iterdir())


@pytest.fixture()
def readonly(tmp_path: Path):
    """A folder nobody may write into: permission bits for a normal user, a read-only tmpfs for root."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("root without permission to mount: cannot make a folder unwritable for this test")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


# -- shard-data ----------------------------------------------------------------------------------------------------

def test_shard_data_refuses_a_decompression_bomb_before_decoding_it(tmp_path):
    (tmp_path / "pool").mkdir()
    bomb_png(tmp_path / "pool" / "bomb.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["shard-data", str(out), "--unlabeled", str(tmp_path / "pool")])
    one_error_line(result.exit_code, result.stderr, "bomb.png", "100000x100000", "--max-pixels")
    assert not out.exists()
    no_partials(tmp_path)


def test_the_pixel_cap_can_be_raised_and_matches_predict(src, tmp_path):
    from distseg.inference.config import PredictConfig
    from distseg.limits import MAX_PIXELS

    assert MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS == PredictConfig().max_pixels  # PIL's own bomb limit
    result = shard_cli(src, tmp_path / "small", "--max-pixels", "1000")
    one_error_line(result.exit_code, result.stderr, "32x32", "1,000-pixel cap")
    assert shard_cli(src, tmp_path / "ok", "--max-pixels", "1024").exit_code == 0


def test_predict_refuses_the_same_bomb(tmp_path, fake_loader):
    bomb_png(tmp_path / "bomb.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "stage"), str(tmp_path / "bomb.png"), "--out",
                                      str(tmp_path / "out"), "--device", "cpu"])
    one_error_line(result.exit_code, result.stderr, "bomb.png", "pixel cap")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["parent-is-a-file", "unwritable"])
def test_shard_data_output_that_cannot_be_written(src, tmp_path, where, request):
    if where == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "shards"
    else:
        out = request.getfixturevalue("readonly") / "shards"
    result = shard_cli(src, out)
    one_error_line(result.exit_code, result.stderr, str(out.parent))
    no_partials(tmp_path)


def test_shard_data_on_a_full_disk_leaves_nothing(src, tmp_path, monkeypatch):
    from distseg.data import writer

    real, calls = writer.SplitWriter.write, []

    def write(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._path))
        return real(self, *args)

    monkeypatch.setattr(writer.SplitWriter, "write", write)
    result = shard_cli(src, tmp_path / "out")
    one_error_line(result.exit_code, result.stderr, "No space left on device", "free space")
    assert not (tmp_path / "out").exists()
    no_partials(tmp_path)


def test_shard_data_force_replaces_only_a_shard_folder(src, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("precious")
    result = shard_cli(src, notes, "--force")
    one_error_line(result.exit_code, result.stderr, "not a shard folder")
    assert [p.name for p in notes.iterdir()] == ["keep.txt"]
    out = tmp_path / "shards"
    assert shard_cli(src, out).exit_code == 0
    (out / "notes.txt").write_text("mine, but inside a shard folder")
    assert shard_cli(src, out, "--force").exit_code == 0 and not (out / "notes.txt").exists()


def test_stale_partial_folders_of_killed_runs_are_removed(src, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}"
    stale.mkdir()
    assert shard_cli(src, tmp_path / "out").exit_code == 0
    assert not stale.exists()


# -- predict ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_loader(monkeypatch):
    """A 4-class 1×1-conv model with a 4-class map stands in for a stage folder."""
    import distseg.engine.checkpoint as checkpoint
    from test_predict import conv_model, tiny_class_map

    monkeypatch.setattr(checkpoint, "load_inference_model",
                        lambda path, device="cpu", **kw: (conv_model().to(device), tiny_class_map()))


def _predict(tmp_path: Path, out: Path):
    if not (tmp_path / "a.png").exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    return CliRunner().invoke(app, ["predict", str(tmp_path / "stage"), str(tmp_path / "a.png"), "--out", str(out),
                                    "--device", "cpu", "--quiet"])


@pytest.mark.parametrize("where", ["parent-is-a-file", "unwritable"])
def test_predict_output_that_cannot_be_written(tmp_path, fake_loader, where, request):
    if where == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "pred"
    else:
        out = request.getfixturevalue("readonly") / "pred"
    result = _predict(tmp_path, out)
    one_error_line(result.exit_code, result.stderr, str(out))


def test_predict_on_a_full_disk_leaves_nothing(tmp_path, fake_loader, monkeypatch):
    def save(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    _predict(tmp_path, tmp_path / "first")  # writes the input image while saving still works
    monkeypatch.setattr(Image.Image, "save", save)
    result = _predict(tmp_path, tmp_path / "pred")
    one_error_line(result.exit_code, result.stderr, "No space left on device")
    assert not (tmp_path / "pred").exists() or not list((tmp_path / "pred").iterdir())


# -- distseg run -----------------------------------------------------------------------------------------------------

def _recipe(tmp_path: Path, shards: Path, init: Path) -> Path:
    from conftest import TINY_MODEL

    data = {"name": "t", "launcher": "python", "model": TINY_MODEL, "datasets": {"target": str(shards)},
            "defaults": {"train": {"steps": 2}},
            "stages": [{"name": "ft", "kind": "finetune", "data": "target", "weights": str(init)}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("where", ["parent-is-a-file", "unwritable", "full-disk"])
def test_run_output_that_cannot_be_written(tmp_path, target_shards, init_weights, where, request, monkeypatch):
    recipe = _recipe(tmp_path, target_shards, init_weights)
    out = tmp_path / "run"
    if where == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    elif where == "unwritable":
        out = request.getfixturevalue("readonly") / "run"
    else:
        import distseg.pipeline.launch as launch_module

        def full(obj, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(launch_module, "save_config", full)
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    one_error_line(result.exit_code, result.stderr, str(out) if where != "full-disk" else "No space left")
    assert not (out / "ft").exists()


# -- stages ----------------------------------------------------------------------------------------------------------

def _stage(tmp_path: Path, shards: Path, init: Path, out: Path, *extra: str, **popen):
    cfg = tiny_stage_config(tmp_path, steps=2, ckpt_every=1, fisher_batches=0)
    cmd = [sys.executable, "-m", "distseg.stages", "finetune", "--config", str(cfg), "--data", str(shards),
           "--parent", str(init), "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=600, **popen)


def _file_size_limit(limit: int):
    """A ``preexec_fn``: writes past ``limit`` bytes fail with EFBIG (a full disk, as the process sees it)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize("where", ["parent-is-a-file", "unwritable", "full-disk"])
def test_stage_output_that_cannot_be_written(tmp_path, target_shards, init_weights, where, request):
    out = tmp_path / "stage"
    popen = {}
    if where == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "stage"
    elif where == "unwritable":
        out = request.getfixturevalue("readonly") / "stage"
    else:
        popen["preexec_fn"] = _file_size_limit(500_000)  # the first checkpoint (~1.7 MB) cannot be written
    proc = _stage(tmp_path, target_shards, init_weights, out, **popen)
    line = one_error_line(proc.returncode, proc.stderr)
    if where == "full-disk":
        assert "could not write the checkpoint" in line and "File too large" in line, line
        assert not list((out / "checkpoint").glob("step*")), "the half-written tag is removed"
        assert not list(out.rglob("*.tmp")) and not json.loads((out / "stage.json").read_text())["finished"]
    else:
        assert str(out.parent) in line and not out.exists()


# -- damaged checkpoints: falling back, and refusing when none is usable ---------------------------------------------

@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory, target_shards, init_weights):
    """An SSL stage (EMA teacher and state in every checkpoint) with all five of its checkpoints kept."""
    tmp = tmp_path_factory.mktemp("ssl_ckpt")
    cfg = tiny_stage_config(tmp, steps=5, ckpt_every=1, keep_checkpoints=10, fisher_batches=0)
    args = ["--config", str(cfg), "--data", str(target_shards), "--init", str(init_weights), "--set", "ssl.tau=0.5"]
    launch("ssl.py", *args, "--out", str(tmp / "ref"))
    return tmp, args


def _interrupted_copy(ref: Path, dst: Path) -> Path:
    """The reference run as a kill after step 4's checkpoint would have left it."""
    shutil.copytree(ref, dst)
    shutil.rmtree(dst / "checkpoint" / "step00000005")
    for name in ("last", "best", "model.safetensors", "student.safetensors"):
        path = dst / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    record = json.loads((dst / "stage.json").read_text())
    (dst / "stage.json").write_text(json.dumps({**record, "finished": False}))
    return dst


@pytest.mark.slow
def test_resume_falls_back_past_damaged_rng_ema_and_teacher_files(ssl_run):
    tmp, args = ssl_run
    run = _interrupted_copy(tmp / "ref", tmp / "damaged")
    ckpt = run / "checkpoint"
    (ckpt / "step00000004" / "rng_rank0.pt").write_bytes(b"garbage")
    (ckpt / "step00000003" / "task_state.pt").write_bytes(b"\x80\x02garbage")
    teacher = ckpt / "step00000002" / "teacher.safetensors"
    teacher.write_bytes(teacher.read_bytes()[:200])
    proc = launch("ssl.py", *args, "--out", str(run), "--resume")
    for tag, name in (("4", "rng_rank0.pt"), ("3", "task_state.pt"), ("2", "teacher.safetensors")):
        assert f"warning: not resuming from step0000000{tag}" in proc.stdout and name in proc.stdout, proc.stdout
    assert "resumed" in proc.stdout and "at step 1" in proc.stdout
    assert json.loads((run / "stage.json").read_text())["finished"]
    for name in ("model.safetensors", "student.safetensors"):  # the fallback still reproduces the run exactly
        a, b = load_file(str(tmp / "ref" / "last" / name)), load_file(str(run / "last" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_resume_with_no_usable_checkpoint_is_one_error_line(ssl_run):
    tmp, args = ssl_run
    run = _interrupted_copy(tmp / "ref", tmp / "hopeless")
    for tag in (run / "checkpoint").glob("step*"):
        (tag / "rng_rank0.pt").write_bytes(b"")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != LOCK_NAME}
    proc = launch("ssl.py", *args, "--out", str(run), "--resume", check=False)
    one_error_line(proc.returncode, proc.stderr, "no usable checkpoint", "step00000004", "rng_rank0.pt")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != LOCK_NAME} == before


@pytest.mark.slow
def test_a_poisoned_fisher_or_weights_file_is_one_error_line(ssl_run, target_shards, tmp_path):
    tmp, _ = ssl_run
    teacher = tmp_path / "teacher"
    shutil.copytree(tmp / "ref", teacher)
    from distseg.fisher import save_fisher

    weights = load_file(str(teacher / "model.safetensors"))
    save_fisher(teacher / "fisher.safetensors", {k: torch.full_like(v, float("nan")) for k, v in weights.items()
                                                  if v.is_floating_point()})
    cfg = tiny_stage_config(tmp_path, steps=2, fisher_batches=0)
    proc = launch("distill.py", "--config", str(cfg), "--data", str(target_shards), "--teacher", str(teacher),
                  "--out", str(tmp_path / "kd"), "--set", "distill.ewc_lambda=1.0", check=False)
    one_error_line(proc.returncode, proc.stderr, "fisher.safetensors", "not a valid Fisher")
    assert not (tmp_path / "kd").exists()
    (teacher / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    result = CliRunner().invoke(app, ["fisher", str(teacher), "--batches", "1", "--batch-size", "2"])
    one_error_line(result.exit_code, result.stderr, "model.safetensors")
    shutil.copy2(teacher / "model.safetensors", teacher / "last" / "model.safetensors")  # eval's headline model
    proc = launch("evaluate.py", str(teacher), "--data", str(target_shards), "--no-sliding", check=False)
    one_error_line(proc.returncode, proc.stderr, "last/model.safetensors")


# -- loader workers, corrupt samples, numbers ------------------------------------------------------------------------

def test_a_data_error_inside_a_loader_worker_is_one_line(target_shards, tmp_path):
    from test_data_stream import corrupt_one

    from distseg.data.augment import AugmentConfig
    from distseg.data.errors import DataError
    from distseg.data.stream import StreamConfig, build_loader

    bad = corrupt_one(target_shards, tmp_path)
    cfg = StreamConfig(batch_size=2, num_workers=2, max_error_rate=0.0, augment=AugmentConfig(crop_size=32))
    with pytest.raises(DataError) as info:  # raised in a worker process, re-raised here by torch
        list(build_loader(bad, "train", cfg))
    message = str(info.value)
    assert "\n" not in message and "Caught" not in message and "Traceback" not in message, message
    assert "above max_error_rate=0.0" in message and "(in DataLoader worker process" in message, message


@pytest.mark.slow
def test_skipped_corrupt_samples_are_counted_in_the_stage_record(target_shards, init_weights, tmp_path):
    from test_data_stream import corrupt_one

    bad = corrupt_one(target_shards, tmp_path)
    proc = _stage(tmp_path, bad, init_weights, tmp_path / "stage", "--set", "data.stream.max_error_rate=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "stage" / "stage.json").read_text())
    assert record["corrupt_samples"]["labelled"] >= 1, record["corrupt_samples"]
    rows = [json.loads(line) for line in (tmp_path / "stage" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-2]["corrupt_samples"] == sum(record["corrupt_samples"].values())


def test_yaml_1_2_numbers_parse_in_set_recipes_and_configs(tmp_path):
    from distseg.config import load_config
    from distseg.pipeline.recipe import load_recipe
    from distseg.stages.config import StageConfig
    from distseg.stages.launcher import build_config

    cfg = build_config("finetune", None, {"parent": "p"}, ["optim.lr=1e-3", "optim.weight_decay=5E-4"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 5e-4
    (tmp_path / "stage.yaml").write_text("kind: finetune\nparent: p\noptim: {lr: 2e-3}\n")
    assert load_config(StageConfig, tmp_path / "stage.yaml").optim.lr == 2e-3
    (tmp_path / "r.yaml").write_text("datasets: {d: shards}\ndefaults: {optim: {lr: 3e-4}}\n"
                                     "stages: [{name: a, kind: finetune, data: d, weights: w}]\n")
    assert load_recipe(tmp_path / "r.yaml").defaults["optim"]["lr"] == 3e-4
