"""Mean-teacher step ops on CPU: fused vs naive EMA and pseudo-labelling, in one run.

* ``ema``: ``EMA.update`` (grouped ``torch._foreach_lerp_``) against a Python loop doing the
  literal α·W_T + (1−α)·W_S per tensor over pre-paired tensors (the headline ratio), and against
  ``ema_update_reference_`` (which also pairs tensors by name on each call), on the parameter and
  buffer shapes of timm's ``hrnet_w48`` (built without weights). Target: ≥ 1.5×.
* ``pseudo``: ``pseudo_label`` (torch.compile'd single pass) against ``pseudo_label_reference``
  (separate ops, per-image and per-class loops) on 8×6×512×512 logits, with confidence, entropy
  and tile filters on. Target: ≥ 2×. The eager run of the fused code is reported too.
* ``step``: the share of a real SSL training step (the ssl ``Trainer`` + ``train_step``) spent outside the network's
  forwards, backward and optimizer update: EMA, pseudo-labelling, CutMix, losses, data hand-off. Target ≤ 5 %.

Each part is a function returning a dict; ``main`` runs the chosen parts, prints the ratios and
merges them into benchmarks/results/ssl.json (other parts' entries are kept).

    python benchmarks/bench_ssl.py [--parts ema,pseudo,step] [--threads 1] [--repeats 10]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from distseg.ops.ema import EMA, ema_update_reference_
from distseg.ops.pseudo import pseudo_label, pseudo_label_reference

RESULTS = Path(__file__).resolve().parent / "results" / "ssl.json"


def compare(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Median and min wall seconds of each candidate, runs interleaved A, B, A, B, ...

    Interleaving spreads the load of a shared machine evenly over the candidates, so their
    ratio is far steadier than timing each candidate in its own block. One untimed warm-up each.
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}


def bench_ema(repeats: int, model_name: str = "hrnet_w48") -> dict:
    """Fused vs per-tensor-loop EMA update over a timm model's parameters and buffers."""
    import timm

    torch.manual_seed(0)
    student = timm.create_model(model_name, pretrained=False)
    teacher = copy.deepcopy(student)
    tensors = list(student.parameters()) + list(student.buffers())
    ema = EMA(teacher, student, alpha=0.999)
    pairs = [(t, s) for t, s in zip(teacher.state_dict().values(), student.state_dict().values())]

    @torch.no_grad()
    def loop_prepaired() -> None:
        for t, s in pairs:
            if t.is_floating_point():
                t.mul_(0.999).add_(s, alpha=0.001)
            else:
                t.copy_(s)

    reference = lambda: ema_update_reference_(teacher, student, 0.999)  # noqa: E731
    t = compare({"fused": ema.update, "naive_loop": loop_prepaired, "reference_fn": reference}, repeats)
    return {
        "model": model_name,
        "tensors": len(tensors),
        "elements": sum(t.numel() for t in tensors),
        **t,
        "speedup": t["naive_loop"]["median_s"] / t["fused"]["median_s"],
        "speedup_vs_reference_fn": t["reference_fn"]["median_s"] / t["fused"]["median_s"],
        "target": 1.5,
    }


def bench_pseudo(repeats: int, shape: tuple[int, int, int, int] = (8, 6, 512, 512)) -> dict:
    """Compiled single-pass pseudo-labelling vs the unfused reference on random logits."""
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 4
    kwargs = dict(tau=0.95, max_entropy=0.5, tile_keep_quantile=0.5)
    start = time.perf_counter()
    pseudo_label(logits, **kwargs)
    compile_s = time.perf_counter() - start
    t = compare(
        {
            "fused_compiled": lambda: pseudo_label(logits, **kwargs),
            "fused_eager": lambda: pseudo_label(logits, compile=False, **kwargs),
            "naive": lambda: pseudo_label_reference(logits, **kwargs),
        },
        repeats,
    )
    return {
        "shape": list(shape),
        "first_call_incl_compile_s": compile_s,
        **t,
        "speedup": t["naive"]["median_s"] / t["fused_compiled"]["median_s"],
        "speedup_eager": t["naive"]["median_s"] / t["fused_eager"]["median_s"],
        "target": 2.0,
    }


def _ssl_stage(folder, backbone: str, size: int, micro_batch: int):
    """A real ssl-stage Trainer (one CPU process) on synthetic shards, started from a random parent."""
    from distseg.bench import fixtures
    from distseg.config import from_dict
    from distseg.data.classes import ClassMap
    from distseg.engine.distributed import init_distributed
    from distseg.models import ModelConfig
    from distseg.stages.config import StageConfig
    from distseg.stages.registry import get_kind
    from distseg.stages.trainer import Trainer

    labelled, unlabelled = fixtures.synthetic_sizes(16, micro_batch, 1, 1)
    shards = fixtures.synthetic_shards(folder, 16, labelled, unlabelled, size)
    model = ModelConfig(backbone=backbone, psa="parallel")
    parent = fixtures.parent_folder(folder / "parent", model, ClassMap.from_manifest(shards))
    cfg = from_dict(StageConfig, {
        "kind": "ssl", "out": str(folder / "run"), "parent": str(parent), "ds_config": "ds_configs/cpu_fp32.json",
        "micro_batch": micro_batch, "grad_accum": 1, "global_batch": micro_batch,
        "data": {"shards": str(shards), "stream": {"num_workers": 1, "augment": {"crop_size": size}}},
        "train": {"steps": 1000, "fisher_batches": 0}})
    return Trainer(get_kind("ssl"), cfg, init_distributed(device="cpu"))


def bench_step(repeats: int, backbone: str = "hrnet_w18_small", size: int = 128, micro_batch: int = 4) -> dict:
    """Share of a real SSL step spent outside the model's forwards, backward and optimizer update.

    ``full`` is ``distseg.engine.loop.train_step`` (data hand-off, teacher TTA, pseudo-labelling, CutMix, two student
    forwards, losses, backward, SGD step, EMA). ``model`` repeats only the network work of that step on the same
    tensors: the teacher on every TTA view, the student on the labelled and the strong batch, backward and the
    optimizer step. Overhead = 1 − model / full. Target ≤ 5 %.
    """
    import tempfile

    from distseg.engine.loop import next_batches, train_step

    with tempfile.TemporaryDirectory(prefix="bench-ssl-step-") as tmp:
        stage = _ssl_stage(Path(tmp), backbone, size, micro_batch)
        task, device = stage.task, stage.env.device
        opts = task.options
        batches = next_batches(stage.data.streams, device)
        images, weak, strong = batches.labelled.image, batches.unlabelled.image, batches.unlabelled.image_strong

        def model_only() -> None:
            with torch.no_grad(), task.autocast:
                task.teacher(torch.cat([weak] * len(opts.tta)))
            with task.autocast:
                loss = stage.engine(images).float().mean() + stage.engine(strong).float().mean()
            stage.engine.backward(loss)
            stage.engine.step()

        def full() -> None:
            train_step(task, stage.engine, stage.data.streams, device, guard=stage.guard)

        t = compare({"full": full, "model": model_only}, repeats)
    share = 1.0 - t["model"]["median_s"] / t["full"]["median_s"]
    return {"backbone": backbone, "size": size, "micro_batch": micro_batch, "tta_views": len(opts.tta), **t,
            "overhead_share": share, "headline": f"overhead share {share:.1%} of the step (target <= 5%)",
            "target": 0.05}


PARTS: dict[str, Callable[[int], dict]] = {"ema": bench_ema, "pseudo": bench_pseudo, "step": bench_step}


def save(results: dict, path: Path = RESULTS) -> None:
    """Merge ``results`` into the JSON file at ``path``, keeping entries of parts not re-run."""
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = comparable across machines)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    torch.set_num_threads(args.threads)
    results = {}
    for name in parts:
        results[name] = {"threads": args.threads, **PARTS[name](args.repeats)}
        r = results[name]
        headline = r.get("headline") or f"speedup {r['speedup']:.2f}x (target >= {r['target']}x)"
        print(f"{name}: {headline}  {json.dumps(r)}")
    save(results)
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
