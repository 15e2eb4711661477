"""One GPU check of distseg in one command (at most 8 minutes on one GPU), with a CPU dry run that CI keeps working.

Four independent parts, each run in a process of its own under its own time limit, so one that fails or hangs is
recorded and the others still run:

1. ``train``: throughput of the real SSL step and of the supervised step (the ``finetune`` kind) through
   ``distseg.bench.train`` (the ``distseg bench train`` timer): HRNetV2-W48 + PSA and EfficientNet-Lite0 (the
   recipes' slim decoder), 512 px, bf16 autocast, channels-last inputs, eager and ``torch.compile``. Images/s, step
   time, data-wait share, peak memory, TFLOPS and MFU against the device's peak.
2. ``infer``: inference images/s of W48 + PSA at 512 px, batch 1 and 8, bf16 and fp32, through ``bench infer``,
   against the study's 42 FPS on an RTX 4090.
3. ``exact``: a 1-GPU DeepSpeed ZeRO-1 bf16 SSL stage (``python -m distseg.stages ssl``) killed with SIGKILL after
   a checkpoint and resumed ends with the same weights as the uninterrupted run; the fused EMA, pseudo-label and
   class-threshold ops equal their naive references on the device, with their speed-ups.
4. ``cuda_paths``: what the CPU tests skip: fp16 dynamic loss scaling (an engine that skips overflowed steps and
   lowers its scale, and a short fp16 stage), SyncBatchNorm conversion and its CUDA kernels, and ``pytest -m gpu``
   over the suite (which holds the CUDA test of ``tests/test_predict.py``).

Weights are random everywhere: the check needs nothing but the repository (no hub, no ImageNet weights), and
random weights cost the same to run.

    python benchmarks/gpu_check.py [--out DIR] [--parts train,infer,exact,cuda_paths] [--budget SECONDS]
    python benchmarks/gpu_check.py --dry-run      # every part at tiny size on CPU (about a minute)

Writes ``gpu_check.json`` and ``gpu_check.md`` (and the ``bench.jsonl`` records of parts 1 and 2) into ``--out``
(default ``benchmarks/results``; a dry run defaults to a fresh temporary folder so it never replaces GPU results).
The exit status is 0 when every part passed, 1 otherwise. See docs/gpu_check.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a bare checkout: distseg need not be installed
    sys.path.insert(0, str(REPO))

PARTS = ("train", "infer", "exact", "cuda_paths")
"""The parts in report order (issue 22's items 1-4)."""
RUN_ORDER = ("infer", "exact", "cuda_paths", "train")
"""Execution order: the part without a fixed cap runs last and gets every second the others left."""
STUDY_FPS = 42.0
"""The study's inference speed of HRNetV2-W48 + PSA at 512 px on an RTX 4090 (batch and precision not stated)."""
RANDOM_WEIGHTS = "random initialisation everywhere (no ImageNet weights are carried; the cost of a step is the same)"
OK_STATUSES = ("ok", "skipped")
"""Item statuses that do not fail a part ('skipped': needs CUDA, in a dry run)."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each part runs: the real GPU check, or the tiny CPU dry run."""

    device: str
    """'cuda' or 'cpu' (every part runs there)."""
    budget_s: float
    """Default time for the whole check (the sum of the parts' limits)."""
    caps_s: dict[str, float]
    """Time limit of each part except ``train``, which gets what is left of the budget."""
    train_models: dict[str, dict[str, Any]]
    """Label -> ModelConfig fields of the models whose training step is timed."""
    train_compiled: tuple[str, ...]
    """Labels of the models timed under torch.compile too (compiling is the slow part of a dry run)."""
    train_size: int
    """Training crop side in pixels."""
    train_micro_batch: int
    """Labelled images per step (the SSL step also reads as many unlabelled ones)."""
    train_warmup: int
    """Untimed steps (the first counts FLOPs; compilation happens in the others)."""
    train_steps: int
    """Timed steps."""
    train_workers: int
    """Loader workers per stream."""
    precision: str
    """'bf16' (torch autocast, the GPU mode) or 'fp32' (a CPU without bf16 units emulates bf16 convolutions,
    slowly) for the training parts and the resumed stage (``ds_configs/zero1_<precision>.json``)."""
    compile_backend: str
    """torch.compile backend ('inductor' on the GPU; 'eager' checks the wiring (graph capture) cheaply on CPU)."""
    infer_model: dict[str, Any]
    """ModelConfig fields of the inference model (the study's W48 + PSA)."""
    infer_size: int
    """Inference input side in pixels."""
    infer_batches: tuple[int, ...]
    """Inference batch sizes."""
    infer_iters: int
    """Timed forwards per batch size (after 3 untimed ones)."""
    exact_model: dict[str, Any]
    """ModelConfig fields of the model of the kill-and-resume SSL stage."""
    exact_size: int
    """Crop side of that stage (and the side of its synthetic images)."""
    exact_steps: int
    """Optimizer steps of that stage."""
    exact_ckpt_every: int
    """Its checkpoint interval."""
    exact_kill_after: int
    """The killed run is stopped once the checkpoint of this step is complete."""
    exact_workers: int
    """Loader workers of that stage."""
    ops_model: str
    """timm model whose parameters and buffers the EMA op blends."""
    ops_logits: tuple[int, int, int, int]
    """B×C×H×W teacher logits for the pseudo-label and class-threshold ops."""
    ops_repeats: int
    """Timed repetitions of each op (median reported)."""
    compile_ops: bool
    """Run the pseudo-label op through torch.compile (its production path)."""
    fp16_steps: int
    """Optimizer steps of the short fp16 stage."""
    pytest_paths: tuple[str, ...]
    """What ``pytest -m gpu`` collects."""


_W48 = {"backbone": "hrnet_w48", "psa": "parallel"}
_LITE0 = {"backbone": "efficientnet_lite0", "psa": "parallel", "aspp_channels": 256, "decoder_channels": 128}
_TINY = {"backbone": "test_resnet", "psa": "parallel", "aspp_rates": [2, 4], "aspp_channels": 16,
         "low_level_channels": 8, "decoder_channels": 16}

FULL = Sizes(
    device="cuda", budget_s=460.0, caps_s={"infer": 50.0, "exact": 130.0, "cuda_paths": 90.0},
    train_models={"hrnet_w48_psa": _W48, "efficientnet_lite0": _LITE0},
    train_compiled=("hrnet_w48_psa", "efficientnet_lite0"), train_size=512, train_micro_batch=8,
    train_warmup=4, train_steps=15, train_workers=6, precision="bf16", compile_backend="inductor",
    infer_model=_W48, infer_size=512, infer_batches=(1, 8), infer_iters=20,
    exact_model={"backbone": "hrnet_w18_small", "psa": "parallel"}, exact_size=128, exact_steps=60,
    exact_ckpt_every=10, exact_kill_after=30, exact_workers=2, ops_model="hrnet_w48", ops_logits=(8, 6, 512, 512),
    ops_repeats=20,
    compile_ops=True, fp16_steps=20, pytest_paths=("tests",),
)
DRY = Sizes(
    device="cpu", budget_s=900.0, caps_s={"infer": 120.0, "exact": 300.0, "cuda_paths": 200.0},
    train_models={"hrnet_w48_psa": _TINY, "efficientnet_lite0": dict(_TINY, psa="none")},
    train_compiled=("efficientnet_lite0",), train_size=64,
    train_micro_batch=2, train_warmup=1, train_steps=2, train_workers=0, precision="fp32", compile_backend="eager",
    infer_model=_TINY, infer_size=64, infer_batches=(1, 2), infer_iters=2,
    exact_model=_TINY, exact_size=64, exact_steps=4, exact_ckpt_every=1, exact_kill_after=2, exact_workers=0,
    ops_model="test_resnet", ops_logits=(2, 6, 32, 32), ops_repeats=2, compile_ops=False, fp16_steps=2,
    pytest_paths=("tests/test_predict.py",),
)


# ----------------------------------------------------------------------------------------------- worker side


class Recorder:
    """A part's results, rewritten to ``path`` after every item, so a part killed at its time limit keeps the items
    it finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"items": {}}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)

    def item(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one check; its dict (with a ``status``) is stored, or the exception as an ``error`` item."""
        start = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            result = fn()
        except Exception as exc:  # any failure of one item is recorded; the part goes on with the next
            result = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:2000]}",
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        print(f"[gpu_check] {name}: {result['status']} ({result['seconds']} s)", flush=True)
        self.data["items"][name] = result
        self.save()
        return result


def _device():
    import torch

    return torch.device("cuda", 0) if SIZES.device == "cuda" else torch.device("cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], repeats: int, device) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after one untimed call, the device drained around each."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def class_map_of(shards: Path):
    """The class map a labelled shard folder records in its manifest."""
    from distseg.data.classes import ClassMap
    from distseg.data.manifest import read_manifest

    return ClassMap.from_dict(read_manifest(shards)["class_map"], where=f"{shards}/manifest.json")


def _model_config(fields: dict[str, Any], **extra):
    from distseg.config import from_dict
    from distseg.models import ModelConfig

    return from_dict(ModelConfig, {**fields, **extra}, where="gpu_check model")


# --- part 1: training throughput


TRAIN_MODES = ("eager", "compile")
TRAIN_FIGURES = ("images_per_s", "unlabeled_images_per_s", "step_time_s", "data_wait_fraction", "peak_memory_gb",
                 "flops_per_step", "tflops_per_gpu", "peak_tflops", "mfu", "precision", "micro_batch", "backbone")


def train_configs(sizes: Sizes, modes: tuple[str, ...] = TRAIN_MODES) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(item name, stage kind, mode, model fields): eager runs first, compiled ones after (compiling is what may
    run out of time, and an eager figure of every step is worth more than a second compiled one)."""
    out = []
    models = list(sizes.train_models.items())
    runs = [("eager", models), ("compile", [m for m in reversed(models) if m[0] in sizes.train_compiled])]
    for mode, chosen in (r for r in runs if r[0] in modes):
        for label, fields in chosen:
            for stage, step in (("ssl", "ssl"), ("finetune", "supervised")):
                out.append((f"{label}.{step}.{mode}", stage, mode, fields))
    return out


def part_train(rec: Recorder, out_dir: Path, work: Path, modes: tuple[str, ...]) -> None:
    """Part 1: each configuration through ``distseg.bench.train.run_train`` on shards generated once."""
    from distseg.bench import fixtures
    from distseg.bench.config import BenchConfig
    from distseg.bench.train import run_train

    distinct = 16 if SIZES.device == "cpu" else 32
    labelled, unlabelled = fixtures.synthetic_sizes(distinct, SIZES.train_micro_batch, 1, 1)
    shards = fixtures.synthetic_shards(work / "train_data", distinct, labelled, unlabelled, SIZES.train_size)
    rec.data["setup"] = {"size": SIZES.train_size, "micro_batch": SIZES.train_micro_batch,
                         "warmup": SIZES.train_warmup, "steps": SIZES.train_steps, "workers": SIZES.train_workers,
                         "precision": SIZES.precision, "channels_last": True, "ds_config": "ZeRO-1",
                         "compile_backend": SIZES.compile_backend, "data": f"{labelled} synthetic JPEG scenes"}

    def one(stage: str, mode: str, fields: dict[str, Any]) -> dict[str, Any]:
        import torch

        if mode == "compile":
            torch._dynamo.reset()  # each compiled model starts from empty caches (no recompile limit shared)
        cfg = BenchConfig(stage=stage, data=str(shards), precision=SIZES.precision,
                          micro_batches=(SIZES.train_micro_batch,),
                          warmup=SIZES.train_warmup, steps=SIZES.train_steps, size=SIZES.train_size,
                          model=_model_config(fields), channels_last=True, compile=mode == "compile",
                          compile_backend=SIZES.compile_backend, num_workers=SIZES.train_workers,
                          synthetic_images=distinct, out_dir=str(out_dir), tag="gpu_check", device=SIZES.device)
        record = run_train(cfg)[0]
        if record["status"] != "ok":
            return {"status": "failed", "error": record.get("error", record["status"])}
        return {"status": "ok", "stage": stage, "compile": mode == "compile",
                **{k: record.get(k) for k in TRAIN_FIGURES}}

    for name, stage, mode, fields in train_configs(SIZES, modes):
        rec.item(name, functools.partial(one, stage, mode, fields))


# --- part 2: inference


def part_infer(rec: Recorder, out_dir: Path, work: Path, modes: tuple[str, ...]) -> None:
    """Part 2: ``bench infer`` of W48 + PSA, channels-last, bf16 and fp32, at each batch size."""
    from distseg.bench.infer import InferOptions, run_infer

    model = _model_config(SIZES.infer_model)
    rec.data["setup"] = {"size": SIZES.infer_size, "channels_last": True, "warmup": 3, "iters": SIZES.infer_iters,
                         "study_fps": STUDY_FPS, "study": "RTX 4090, batch and precision not stated"}

    def one(batch: int, precision: str) -> dict[str, Any]:
        opts = InferOptions(size=SIZES.infer_size, batch=batch, channels_last=True, precision=precision,
                            device=SIZES.device, warmup=3, iters=SIZES.infer_iters, tag="gpu_check")
        r = run_infer(model, opts, str(out_dir))
        return {"status": "ok", "batch": batch, "precision": precision, "images_per_s": r["images_per_s"],
                "ms_per_batch": r["step_time_s"]["median"] * 1e3,
                "vs_study": r["images_per_s"] / STUDY_FPS if SIZES.device == "cuda" else None,
                "tflops": r["tflops_per_gpu"], "mfu": r["mfu"], "peak_memory_gb": r["peak_memory_gb"][0],
                "backbone": r["backbone"]}

    for batch in SIZES.infer_batches:
        for precision in ("bf16", "fp32"):
            rec.item(f"b{batch}.{precision}", functools.partial(one, batch, precision))


# --- part 3: exactness


STAGE_PRELUDE = (
    "import os, sys\n"
    "from distseg.resources import configure_threads\n"
    "configure_threads(int(os.environ.get('LOCAL_WORLD_SIZE', '1')))\n"  # before torch, as the module entry does
    "import torch\n"
    "torch.backends.cudnn.benchmark = False\n"
    "torch.backends.cudnn.deterministic = True\n"
    "torch.use_deterministic_algorithms(True, warn_only=True)\n"
    "from distseg.stages.__main__ import main\n"
    "main(sys.argv[1:])\n"
)
"""``python -m distseg.stages`` with PyTorch's deterministic algorithms where they exist (warnings, not errors,
for the ops that have none), so two runs can be compared bit for bit."""


def stage_command(kind: str, *args: str) -> list[str]:
    """The stage CLI (``python -m distseg.stages KIND``) under :data:`STAGE_PRELUDE`."""
    device = ["--device", "cpu"] if SIZES.device == "cpu" else []
    return [sys.executable, "-c", STAGE_PRELUDE, kind, *args, *device]


def single_process_env() -> dict[str, str]:
    """This environment without a launcher's rank variables: every process the check starts is one rank alone."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)
    return env


def stage_env() -> dict[str, str]:
    """A stage run of the exactness part: deterministic cuBLAS workspaces on top of :func:`single_process_env`."""
    return dict(single_process_env(), CUBLAS_WORKSPACE_CONFIG=":4096:8")


def run_stage(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=stage_env(), cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"stage exited {proc.returncode}: {proc.stderr[-1500:]}")
    return proc


def kill_after_checkpoint(cmd: list[str], out: Path, step: int, timeout: float = 300) -> int:
    """Start a stage and SIGKILL its whole process group as soon as a checkpoint of step >= ``step`` is complete;
    returns the newest complete step at the kill. Raises if the run ended first."""
    from distseg.engine.checkpoint import complete_tags

    log = out.with_name(out.name + ".log")
    with log.open("w") as fh:  # a file, not a pipe: nobody reads while the run goes, and a full pipe would block it
        proc = subprocess.Popen(cmd, env=stage_env(), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline, newest = time.time() + timeout, -1
    while proc.poll() is None and time.time() < deadline:
        tags = complete_tags(out / "checkpoint")
        newest = int(tags[0][4:]) if tags else -1
        if newest >= step:
            break
        time.sleep(0.01)
    ended = proc.poll() is not None
    if not ended:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if ended:
        raise RuntimeError(f"the run ended (exit {proc.returncode}) before its step-{step} checkpoint: "
                           f"{log.read_text(errors='replace')[-1500:]}")
    if newest < step:
        raise RuntimeError(f"no step-{step} checkpoint within {timeout:.0f} s")
    return newest


def weights_difference(a: Path, b: Path) -> dict[str, Any]:
    """Largest absolute difference between same-named tensors of every weights file a finished stage exports."""
    from safetensors.torch import load_file

    files = sorted(p.name for p in a.glob("*.safetensors"))
    if not files or files != sorted(p.name for p in b.glob("*.safetensors")):
        raise RuntimeError(f"{a} and {b} export different weights files")
    worst = 0.0
    for name in files:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys():
            raise RuntimeError(f"{name}: different tensor names")
        for k in x:
            worst = max(worst, (x[k].double() - y[k].double()).abs().max().item() if x[k].numel() else 0.0)
    return {"files": files, "max_abs_diff": worst}


def _finished_steps(folder: Path) -> int:
    record = json.loads((folder / "stage.json").read_text())
    if not record.get("finished"):
        raise RuntimeError(f"{folder}: the stage did not finish")
    return int(record["steps"])


def check_resume(work: Path) -> dict[str, Any]:
    """The uninterrupted SSL stage against one killed after a checkpoint and resumed; a second uninterrupted run
    only when they differ, to tell a resume bug (runs repeat exactly) from non-deterministic kernels."""
    import yaml

    from distseg.bench import fixtures
    from distseg.data.shard import shard_dataset
    from distseg.data.synthetic import write_dataset

    raw = write_dataset(work / "exact_raw", 24, size=SIZES.exact_size, n_unlabeled=24)
    shards = work / "exact_shards"
    shard_dataset(shards, images=raw / "images", masks=raw / "masks", unlabeled=raw / "unlabeled",
                  classes=raw / "classes.yaml", split="6:1:1", shard_size=4, force=True)
    parent = fixtures.parent_folder(work / "exact_parent", _model_config(SIZES.exact_model), class_map_of(shards))
    config = {"model": SIZES.exact_model, "micro_batch": 4, "grad_accum": 1, "global_batch": 4,
              "data": {"stream": {"num_workers": SIZES.exact_workers, "shuffle_buffer": 16,
                                  "augment": {"crop_size": SIZES.exact_size}}},
              "train": {"steps": SIZES.exact_steps, "log_every": SIZES.exact_ckpt_every,
                        "ckpt_every": SIZES.exact_ckpt_every, "keep_checkpoints": 100, "fisher_batches": 0,
                        "eval_batch_size": 4},
              "optim": {"lr": 0.01}, "loss": {"kind": "ce"}, "ssl": {"tau": 0.5, "adaptive_tau": True}}
    cfg = work / "exact_ssl.yaml"
    cfg.write_text(yaml.safe_dump(config))

    def command(out: Path) -> list[str]:
        return stage_command("ssl", "--config", str(cfg), "--data", str(shards), "--parent", str(parent),
                             "--ds_config", f"ds_configs/zero1_{SIZES.precision}.json", "--out", str(out))

    straight, killed = work / "exact_straight", work / "exact_killed"
    run_stage(command(straight), timeout=300)
    killed_at = kill_after_checkpoint(command(killed), killed, SIZES.exact_kill_after)
    resumed = run_stage(command(killed) + ["--resume"], timeout=300)
    steps = (_finished_steps(straight), _finished_steps(killed))
    diff = weights_difference(straight, killed)
    result = {"stage": "ssl (adaptive tau)", "ds_config": f"zero1_{SIZES.precision}",
              "backbone": SIZES.exact_model["backbone"],
              "size": SIZES.exact_size, "steps": SIZES.exact_steps, "killed_after_checkpoint": killed_at,
              "resume_reported": "resum" in resumed.stdout.lower() + resumed.stderr.lower(),
              "finished_steps": list(steps), "resumed_max_abs_diff": diff["max_abs_diff"], "files": diff["files"],
              "deterministic_algorithms": "torch.use_deterministic_algorithms(True, warn_only=True)"}
    if steps[0] != steps[1] or steps[0] != SIZES.exact_steps:
        return {**result, "status": "failed", "why": "the runs did not end at the same step"}
    if diff["max_abs_diff"] == 0.0:
        return {**result, "status": "ok", "verdict": "bit-identical"}
    again = work / "exact_again"
    run_stage(command(again), timeout=300)
    noise = weights_difference(straight, again)["max_abs_diff"]
    result["rerun_max_abs_diff"] = noise
    if noise == 0.0:
        return {**result, "status": "failed", "verdict": "uninterrupted runs repeat exactly but the resumed differs"}
    return {**result, "status": "inconclusive",
            "verdict": "two uninterrupted runs already differ (non-deterministic kernels); compare the two diffs"}


def _close(a, b, rtol: float = 1e-5, atol: float = 1e-6) -> float:
    """Largest |a - b| after checking ``torch.testing.assert_close`` (raises AssertionError when not close)."""
    import torch

    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_ema() -> dict[str, Any]:
    """``EMA.update`` (grouped foreach lerp) against ``ema_update_reference_`` (per-tensor loop) on a real model."""
    import copy

    import timm
    import torch

    from distseg.ops.ema import EMA, ema_update_reference_

    device = _device()
    torch.manual_seed(0)
    student = timm.create_model(SIZES.ops_model, pretrained=False).to(device)
    teacher_a, teacher_b = copy.deepcopy(student), copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ema = EMA(teacher_a, student, alpha=0.99)
    for _ in range(3):
        ema.update()
        ema_update_reference_(teacher_b, student, 0.99)
    a, b = teacher_a.state_dict(), teacher_b.state_dict()
    diff = max(_close(a[k], b[k]) if a[k].is_floating_point() else float(not torch.equal(a[k], b[k])) for k in a)
    fused = median_seconds(ema.update, SIZES.ops_repeats, device)
    naive = median_seconds(lambda: ema_update_reference_(teacher_b, student, 0.99), SIZES.ops_repeats, device)
    tensors = len(a)
    return {"status": "ok", "model": SIZES.ops_model, "tensors": tensors, "max_abs_diff": diff,
            "fused_ms": fused * 1e3, "naive_ms": naive * 1e3, "speedup": naive / fused}


def check_pseudo() -> dict[str, Any]:
    """``pseudo_label`` (one compiled pass) against ``pseudo_label_reference`` (separate ops and loops)."""
    import torch

    from distseg.ops import pseudo
    from distseg.ops.pseudo import pseudo_label, pseudo_label_reference

    device = _device()
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(*SIZES.ops_logits, generator=g) * 3).to(device)
    tau = torch.linspace(0.6, 0.9, SIZES.ops_logits[1], device=device)
    kwargs = {"tau": tau, "max_entropy": 0.8, "tile_keep_quantile": 0.75}
    fused = pseudo_label(logits, compile=SIZES.compile_ops, **kwargs)
    ref = pseudo_label_reference(logits, **kwargs)
    diffs = {}
    for name in fused._fields:
        a, b = getattr(fused, name), getattr(ref, name)
        if a.is_floating_point():
            diffs[name] = _close(a, b)
        elif not torch.equal(a, b):
            return {"status": "failed", "why": f"{name} differs from the reference"}
    fused_s = median_seconds(lambda: pseudo_label(logits, compile=SIZES.compile_ops, **kwargs), SIZES.ops_repeats,
                             device)
    naive_s = median_seconds(lambda: pseudo_label_reference(logits, **kwargs), SIZES.ops_repeats, device)
    return {"status": "ok", "logits": list(SIZES.ops_logits), "compiled": SIZES.compile_ops and not
            pseudo._Compiled.failed, "kept_fraction": fused.keep.float().mean().item(),
            "max_abs_diff": max(diffs.values()), "fused_ms": fused_s * 1e3, "naive_ms": naive_s * 1e3,
            "speedup": naive_s / fused_s}


def thresholds_reference(sigma, seen, probs, momentum: float):
    """Naive per-class update of the running confidence: one masked mean per class, blended the same way."""
    confidence, argmax = probs.float().max(dim=1)
    sigma, seen = sigma.clone(), seen.clone()
    for c in range(sigma.numel()):
        mask = argmax == c
        if not mask.any():
            continue
        mean = confidence[mask].mean()
        sigma[c] = momentum * sigma[c] + (1 - momentum) * mean if seen[c] else mean
        seen[c] = True
    return sigma, seen


def check_thresholds() -> dict[str, Any]:
    """``ClassThresholds.update`` (scatter-add on the device) against a per-class masked-mean loop."""
    import torch

    from distseg.ops.thresholds import ClassThresholds

    device = _device()
    b, c, h, w = SIZES.ops_logits
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.softmax(torch.randn(b, c, h, w, generator=g) * 2, dim=1).to(device) for _ in range(3)]
    batches[1][:, c - 1] = 0.0  # the last class is absent from the second batch: it must keep its value
    fused = ClassThresholds(c, tau=0.9, momentum=0.8, device=device)
    sigma, seen = fused.sigma.clone(), fused.seen.clone()
    for probs in batches:
        fused.update(probs)
        sigma, seen = thresholds_reference(sigma, seen, probs, 0.8)
    diff = _close(fused.sigma, sigma)
    if not torch.equal(fused.seen, seen):
        return {"status": "failed", "why": "the seen flags differ from the reference"}
    probs = batches[0]
    fused_s = median_seconds(lambda: fused.update(probs), SIZES.ops_repeats, device)
    naive_s = median_seconds(lambda: thresholds_reference(sigma, seen, probs, 0.8), SIZES.ops_repeats, device)
    return {"status": "ok", "probs": [b, c, h, w], "max_abs_diff": diff, "thresholds": fused.thresholds().tolist(),
            "fused_ms": fused_s * 1e3, "naive_ms": naive_s * 1e3, "speedup": naive_s / fused_s}


def part_exact(rec: Recorder, out_dir: Path, work: Path, modes: tuple[str, ...]) -> None:
    """Part 3: kill-and-resume exactness of a ZeRO-1 bf16 SSL stage, then the three fused ops."""
    rec.item("resume", lambda: check_resume(work))
    rec.item("ema", check_ema)
    rec.item("pseudo_label", check_pseudo)
    rec.item("class_thresholds", check_thresholds)


# --- part 4: CUDA-only paths


def _skipped_on_cpu() -> dict[str, Any] | None:
    return {"status": "skipped", "reason": "needs CUDA (dry run on CPU)"} if SIZES.device == "cpu" else None


def check_fp16_engine() -> dict[str, Any]:
    """DeepSpeed's dynamic loss scaling (ZeRO-1 fp16) around distseg's engine: a normal step changes the weights,
    an overflowing one is skipped with the weights untouched, and repeated overflows lower the loss scale."""
    skipped = _skipped_on_cpu()
    if skipped:
        return skipped
    import torch

    from distseg.engine.deepspeed_engine import build_engine
    from distseg.engine.distributed import init_distributed
    from distseg.models import build_model
    from distseg.stages.config import OptimConfig

    env = init_distributed()
    torch.manual_seed(0)
    model = build_model(_model_config(_TINY, num_classes=4))
    engine, _ = build_engine(model, model.parameters(), ds_config=str(REPO / "ds_configs/zero1_fp16.json"),
                             optim=OptimConfig(name="adamw", lr=1e-3), total_steps=10, env=env, micro_batch=2,
                             grad_accum=1, global_batch=2)
    x = torch.rand(2, 3, 64, 64, device=env.device, dtype=torch.half)
    y = torch.randint(0, 4, (2, 64, 64), device=env.device)

    def step(scale: float) -> bool:
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y) * scale
        engine.backward(loss)
        engine.step()
        return bool(engine.was_step_applied())

    def weights() -> list:
        return [p.detach().float().clone() for p in engine.module.parameters()]

    def scale_now() -> float:
        return float(engine.optimizer.loss_scale)

    initial_scale, before = scale_now(), weights()
    natural_overflows = 0
    while not step(1.0):  # the first scale (2^16) may overflow a fresh model's gradients: it then lowers itself
        natural_overflows += 1
        if natural_overflows > 16:
            raise RuntimeError("no fp16 step was applied in 17 tries")
    changed = any(not torch.equal(a, b) for a, b in zip(before, weights()))
    working_scale, scales, overflow_applied, before = scale_now(), [], [], weights()
    for _ in range(3):
        overflow_applied.append(step(float("inf")))
        scales.append(scale_now())
    untouched = all(torch.equal(a, b) for a, b in zip(before, weights()))
    recovered = step(1.0)
    ok = changed and not any(overflow_applied) and untouched and scales[-1] < working_scale and recovered
    return {"status": "ok" if ok else "failed", "initial_scale": initial_scale,
            "overflows_before_first_step": natural_overflows, "working_scale": working_scale,
            "scales_after_overflows": scales, "weights_changed": changed, "overflow_steps_applied": overflow_applied,
            "weights_untouched_by_overflows": untouched, "step_after_overflows_applied": recovered,
            "skipped_steps": int(getattr(engine, "skipped_steps", -1))}


def check_fp16_stage(work: Path) -> dict[str, Any]:
    """A short finetune stage with ``ds_configs/zero1_fp16.json`` through the stage CLI finishes with finite
    weights."""
    skipped = _skipped_on_cpu()
    if skipped:
        return skipped
    import yaml
    from safetensors.torch import load_file

    from distseg.bench import fixtures
    from distseg.data.shard import shard_dataset
    from distseg.data.synthetic import write_dataset

    raw = write_dataset(work / "fp16_raw", 16, size=64)
    shards = work / "fp16_shards"
    shard_dataset(shards, images=raw / "images", masks=raw / "masks", classes=raw / "classes.yaml",
                  split="6:1:1", shard_size=4, force=True)
    cfg = work / "fp16.yaml"
    cfg.write_text(yaml.safe_dump({"model": _TINY, "micro_batch": 4, "grad_accum": 1, "global_batch": 4,
                                   "data": {"stream": {"num_workers": 0, "augment": {"crop_size": 64}}},
                                   "train": {"steps": SIZES.fp16_steps, "log_every": 5, "fisher_batches": 0},
                                   "optim": {"lr": 0.01}, "loss": {"kind": "ce"}}))
    parent = fixtures.parent_folder(work / "fp16_parent", _model_config(_TINY), class_map_of(shards))
    out = work / "fp16_stage"
    run_stage(stage_command("finetune", "--config", str(cfg), "--data", str(shards), "--parent", str(parent),
                            "--ds_config", "ds_configs/zero1_fp16.json", "--out", str(out)), timeout=240)
    steps = _finished_steps(out)
    exported = sorted(out.glob("*.safetensors"))
    finite = bool(exported) and all(t.isfinite().all().item() for path in exported
                                    for t in load_file(str(path)).values() if t.is_floating_point())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    ok = steps == SIZES.fp16_steps and finite and bool(losses) and all(math.isfinite(v) for v in losses)
    return {"status": "ok" if ok else "failed", "steps": steps, "weights_finite": finite, "losses": losses,
            "skipped_steps": next((m["skipped_steps"] for m in reversed(metrics) if "skipped_steps" in m), None)}


def check_sync_bn() -> dict[str, Any]:
    """``maybe_convert_sync_bn`` converts every BatchNorm for a multi-GPU job (and none on CPU), and SyncBatchNorm's
    CUDA kernels (stats, all-gather in a one-rank NCCL group, backward) equal plain BatchNorm."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from distseg.engine.distributed import DistEnv, init_distributed, maybe_convert_sync_bn
    from distseg.models import build_model

    device = _device()
    model = build_model(_model_config(_TINY, num_classes=4))
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    converted = maybe_convert_sync_bn(model, DistEnv(rank=0, local_rank=0, world_size=2, device=device))
    syncs = sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    expected = bns if device.type == "cuda" else 0
    result = {"batchnorm_layers": bns, "converted": syncs, "expected": expected}
    if syncs != expected:
        return {**result, "status": "failed", "why": "conversion did not match the rule"}
    if device.type == "cpu":
        return {**result, "status": "ok", "kernels": "skipped: SyncBatchNorm's kernels need CUDA"}
    from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction

    init_distributed()
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(32).to(device).train()
    x = torch.randn(8, 32, 40, 40, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = nn.functional.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, True,
                                   bn.momentum, bn.eps)
    out = SyncBNFunction.apply(x2, bn.weight, bn.bias, bn.running_mean.clone(), bn.running_var.clone(), bn.eps,
                               bn.momentum, dist.group.WORLD, 1)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    forward = _close(out, ref, rtol=1e-4, atol=1e-4)
    backward = _close(x2.grad, x.grad, rtol=1e-4, atol=1e-4)
    return {**result, "status": "ok", "forward_max_abs_diff": forward, "input_grad_max_abs_diff": backward}


def check_pytest(work: Path) -> dict[str, Any]:
    """``pytest -m gpu`` over the suite: every CUDA-marked test, with the outcome of each."""
    import xml.etree.ElementTree as ET

    junit = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=",
           "--continue-on-collection-errors", f"--junitxml={junit}", *SIZES.pytest_paths]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    tests = {}
    errors = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    if tag != "skipped":
                        errors.append(f"{case.get('name')}: {(node.get('message') or '')[:300]}")
            name = f"{case.get('classname')}::{case.get('name')}"
            tests[name] = outcome
    cuda_predict = {k: v for k, v in tests.items() if "test_predict" in k}
    bad = [k for k, v in tests.items() if v in ("failed", "error")]
    expected = "skipped" if SIZES.device == "cpu" else "passed"
    ok = proc.returncode in (0, 5) and not bad and cuda_predict and all(v == expected
                                                                       for v in cuda_predict.values())
    return {"status": "ok" if ok else "failed", "returncode": proc.returncode, "tests": tests,
            "test_predict_cuda": cuda_predict, "problems": errors,
            "summary": (proc.stdout.strip().splitlines() or [""])[-1], "stderr_tail": proc.stderr[-1000:]}


def part_cuda_paths(rec: Recorder, out_dir: Path, work: Path, modes: tuple[str, ...]) -> None:
    """Part 4: fp16 loss scaling, SyncBatchNorm, and the CUDA-marked tests."""
    rec.item("fp16_loss_scaling", check_fp16_engine)
    rec.item("fp16_stage", lambda: check_fp16_stage(work))
    rec.item("sync_batchnorm", check_sync_bn)
    rec.item("pytest_gpu", lambda: check_pytest(work))


PART_FUNCTIONS = {"train": part_train, "infer": part_infer, "exact": part_exact, "cuda_paths": part_cuda_paths}


def run_worker(part: str, out_dir: Path, work: Path, modes: tuple[str, ...] = TRAIN_MODES) -> None:
    """One part in this process: device and versions first, then its items."""
    from distseg.bench.records import device_info, versions

    rec = Recorder(work / f"{part}.json")
    rec.data["device"] = device_info(_device())
    rec.data["versions"] = versions()
    rec.save()
    part_dir = work / part
    part_dir.mkdir(exist_ok=True)
    PART_FUNCTIONS[part](rec, out_dir, part_dir, modes)


# ------------------------------------------------------------------------------------------ orchestrator side


def requirement_report() -> list[dict[str, Any]]:
    """Each of distseg's declared dependencies: the installed version and whether it satisfies the pin (rasterio,
    say, may be absent: distseg imports it only where GeoTIFFs are read)."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    rows = []
    for text in deps:
        req = Requirement(text)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            version = None
        rows.append({"name": req.name, "required": str(req.specifier), "installed": version,
                     "ok": version is not None and req.specifier.contains(version, prereleases=True)})
    return rows


def _tail(path: Path, chars: int = 2500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it (collected first, so nothing is re-parented away unseen)."""
    from distseg.supervise import descendants

    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_part(part: str, timeout: float, out_dir: Path, work: Path, dry_run: bool,
             modes: tuple[str, ...] = TRAIN_MODES) -> dict[str, Any]:
    """Run one part in its own process group under ``timeout`` seconds; its record, whatever happened."""
    log = work / f"{part}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part, "--work", str(work), "--out",
           str(out_dir), "--train-modes", ",".join(modes)] + (["--dry-run"] if dry_run else [])
    env = dict(single_process_env(), PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            code = None
    seconds = round(time.perf_counter() - start, 1)
    result_file = work / f"{part}.json"
    record = json.loads(result_file.read_text()) if result_file.exists() else {"items": {}}
    record.update(seconds=seconds, limit_s=round(timeout, 1), returncode=code)
    items = record["items"]
    if code is None:
        record["status"] = "timeout"
    elif code != 0 or not items:
        record["status"] = "error"
    else:
        record["status"] = "ok" if all(i["status"] in OK_STATUSES for i in items.values()) else "failed"
    if record["status"] != "ok":
        record["log_tail"] = _tail(log)
    return record


def plan_limits(parts: list[str], budget: float, caps: dict[str, float]) -> Callable[[str, float], float]:
    """Time limit of each part when it starts: its cap, but never eating the caps of the parts still to come;
    ``train`` (no cap) gets everything left."""

    def limit(part: str, elapsed: float) -> float:
        later = parts[parts.index(part) + 1:]
        free = budget - elapsed - sum(caps.get(p, 0.0) for p in later)
        return max(0.0, free if part not in caps else min(caps[part], free))

    return limit


# --- markdown


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a header naming the device, then one table per part."""
    dev = report.get("device") or {}
    title = "GPU check (dry run on CPU, tiny sizes: figures are not GPU figures)" if report["dry_run"] else "GPU check"
    versions = report.get("versions") or {}
    device = (f"Device: {dev.get('name', '?')} ({dev.get('type', '?')}, driver {dev.get('driver')}, CUDA "
              f"{dev.get('cuda')}); torch {versions.get('torch')}, deepspeed {versions.get('deepspeed')}; "
              f"git {report.get('git_rev')}; {report['wall_s']} s.")
    lines = [f"# {title}", "", device,
             f"Weights: {report['weights']}.", "",
             "| part | status | seconds (limit) |", "|---|---|---|"]
    for name in PARTS:
        p = report["parts"].get(name)
        if p:
            lines.append(f"| {name} | {p['status']} | {p['seconds']} ({p['limit_s']}) |")
    parts = report["parts"]
    if "train" in parts:
        rows = []
        for name, i in parts["train"]["items"].items():
            if i["status"] == "ok":
                rows.append([name, i["backbone"], i["micro_batch"], i["images_per_s"], i["step_time_s"]["median"],
                             i["data_wait_fraction"], i["peak_memory_gb"][0], i["tflops_per_gpu"], i["mfu"]])
            else:
                rows.append([name, i["status"], *[None] * 7])
        lines += ["", f"## 1. Training step ({report['sizes']['precision']}, channels-last)", ""]
        lines += _table(["config", "backbone", "batch", "images/s", "step s (median)", "data-wait", "peak GiB",
                         "TFLOPS", "MFU"], rows)
    if "infer" in parts:
        rows = [[name, i.get("images_per_s"), i.get("ms_per_batch"), i.get("vs_study"), i.get("mfu"), i["status"]]
                for name, i in parts["infer"]["items"].items()]
        lines += ["", f"## 2. Inference, W48 + PSA (study: {STUDY_FPS:g} FPS on an RTX 4090)", ""]
        lines += _table(["batch.precision", "images/s", "ms/batch", "× study", "MFU", "status"], rows)
    if "exact" in parts:
        items = parts["exact"]["items"]
        lines += ["", "## 3. Exactness", ""]
        r = items.get("resume")
        if r:
            lines.append(f"- kill -9 after the step-{r.get('killed_after_checkpoint')} checkpoint and resume: "
                         f"**{r['status']}** ({r.get('verdict', r.get('error', r.get('why', '')))}); max |Δw| "
                         f"{_fmt(r.get('resumed_max_abs_diff'))}"
                         + (f", two straight runs {_fmt(r['rerun_max_abs_diff'])}" if "rerun_max_abs_diff" in r
                            else ""))
        rows = [[n, items[n]["status"], items[n].get("max_abs_diff"), items[n].get("fused_ms"),
                 items[n].get("naive_ms"), items[n].get("speedup")]
                for n in ("ema", "pseudo_label", "class_thresholds") if n in items]
        lines += [""] + _table(["op", "status", "max |Δ| vs reference", "fused ms", "naive ms", "speed-up"], rows)
    if "cuda_paths" in parts:
        lines += ["", "## 4. CUDA-only paths", ""]
        for name, i in parts["cuda_paths"]["items"].items():
            detail = i.get("reason") or i.get("why") or i.get("error") or ""
            if name == "pytest_gpu":
                detail = f"{i.get('summary', '')}; test_predict CUDA test: {i.get('test_predict_cuda')}"
            elif name == "fp16_loss_scaling" and i["status"] != "skipped":
                detail = f"scale {i.get('working_scale')} → {i.get('scales_after_overflows')} after overflows"
            elif name == "sync_batchnorm":
                detail = f"{i.get('converted')}/{i.get('batchnorm_layers')} converted" + (
                    f", kernels max |Δ| {_fmt(i.get('forward_max_abs_diff'))}" if "forward_max_abs_diff" in i else "")
            lines.append(f"- {name}: **{i['status']}** {detail}".rstrip())
    missing = [r["name"] for r in report["requirements"] if not r["ok"]]
    if missing:
        lines += ["", f"Declared dependencies absent or off their pins here: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def orchestrate(args: argparse.Namespace) -> int:
    """Run the chosen parts one after another, each in its own process and time limit; write the report."""
    parts = [p for p in RUN_ORDER if p in args.parts]
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-")) if args.dry_run
                                               else REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    budget = args.budget or SIZES.budget_s
    limit = plan_limits(parts, budget, SIZES.caps_s)
    start = time.perf_counter()
    report: dict[str, Any] = {"dry_run": args.dry_run, "budget_s": budget, "train_modes": list(args.train_modes),
                              "weights": RANDOM_WEIGHTS,
                              "sizes": dataclasses.asdict(SIZES), "requirements": requirement_report(), "parts": {}}
    try:
        for part in parts:
            seconds = limit(part, time.perf_counter() - start)
            print(f"[gpu_check] part {part}: limit {seconds:.0f} s", flush=True)
            if seconds < 5:
                report["parts"][part] = {"status": "not run", "why": "no time left in the budget", "seconds": 0,
                                         "limit_s": round(seconds, 1), "items": {}}
                continue
            report["parts"][part] = run_part(part, seconds, out_dir, work, args.dry_run, args.train_modes)
            print(f"[gpu_check] part {part}: {report['parts'][part]['status']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = next((p for p in report["parts"].values() if "device" in p), {})
    report.update(device=first.get("device"), versions=first.get("versions"), wall_s=round(time.perf_counter() -
                                                                                          start, 1))
    from distseg.engine.checkpoint import git_revision

    report["git_rev"] = git_revision()
    ordered = {p: report["parts"][p] for p in PARTS if p in report["parts"]}
    report["parts"] = ordered
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = render_markdown(report)
    (out_dir / "gpu_check.md").write_text(md)
    print(md)
    print(f"[gpu_check] wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    return 0 if all(p["status"] == "ok" for p in ordered.values()) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="Every part at tiny size on CPU.")
    parser.add_argument("--out", help="Folder of gpu_check.json/.md and bench.jsonl (default benchmarks/results; "
                                      "a dry run: a new temporary folder).")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"Comma-separated subset of {','.join(PARTS)}.")
    parser.add_argument("--budget", type=float, help="Seconds for the whole check (default 460; dry run 900).")
    parser.add_argument("--train-modes", default=",".join(TRAIN_MODES),
                        help="Part train: eager, compile or both (a second try can time the compiled runs alone).")
    parser.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        parser.error(f"--parts: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    args.train_modes = tuple(m.strip() for m in args.train_modes.split(",") if m.strip())
    if not args.train_modes or set(args.train_modes) - set(TRAIN_MODES):
        parser.error(f"--train-modes: choose from {','.join(TRAIN_MODES)}")
    return args


SIZES = FULL


def main(argv: list[str] | None = None) -> int:
    global SIZES
    args = parse_args(argv)
    SIZES = DRY if args.dry_run else FULL
    if args.worker:
        run_worker(args.worker, Path(args.out), Path(args.work), args.train_modes)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
