"""DDPM feature extraction per batch: throughput and peak memory against the batch size, and early stopping vs a
full UNet forward.

Part 1 extracts features with :class:`distseg.models.diffusion_features.DiffusionFeatures` (the ddpm_head stage's
extractor) for each batch size, each in a fresh subprocess, and records images/s (best of ``--repeats``), CPU seconds
per image and the peak memory the batch adds: on CUDA ``max_memory_allocated``; on CPU the growth of the process's
peak RSS over its value after the model was built. It also reports the bytes of the feature tensor itself, and what a
feature cache (the reference implementation's approach) would hold for the labelled train split.

Part 2 compares the extractor, which stops the UNet once the deepest chosen decoder layer has run, with a naive
extractor that runs the whole UNet and collects the same layers with hooks (the features are checked to be equal).

The extractor is the one of a ddpm_head stage folder (``--stage DIR``) or the recipe's settings
(``recipes/dubai_ddpm.yaml``); weights are random unless a stage folder is given (speed does not depend on them).
Results go to benchmarks/results/ddpm_features.{json,csv}.

    python benchmarks/bench_ddpm_features.py [--stage runs/dubai_ddpm/head.s0] [--size 256] [--batches 1,2,4,8]
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_TILES = 139
"""Labelled train tiles of the Dubai protocol (what a feature cache would hold)."""


def recipe_config() -> dict:
    """The ddpm_head model config of the shipped recipe (denoiser and extractor as the experiment ran them)."""
    from distseg.config import from_dict, read_mapping, to_dict
    from distseg.models.ddpm_head import DDPMSegmenterConfig
    from distseg.resources import folder

    recipe = read_mapping(folder("recipes") / "dubai_ddpm.yaml")
    denoiser = recipe["kind_defaults"]["ddpm"]["ddpm"]["denoiser"]
    head = recipe["kind_defaults"]["ddpm_head"]["ddpm_head"]
    cfg = from_dict(DDPMSegmenterConfig, {"denoiser": denoiser, "extractor": head["extractor"],
                                          "head": head.get("head", {}), "num_classes": 5})
    return to_dict(cfg)


def build(model_cfg: dict, stage: str | None):
    """The extractor of ``model_cfg`` (with the stage's weights when a stage folder is given), in eval mode."""
    from distseg.models import model_config_from_dict
    from distseg.models.ddpm_head import DDPMSegmenter

    model = DDPMSegmenter(model_config_from_dict(model_cfg))
    if stage:
        from distseg.models.weights import load_weights

        load_weights(model, Path(stage) / "model.safetensors", strict=True)
    return model.features.eval()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_batch(model_cfg: dict, stage: str | None, batch: int, size: int, repeats: int, device: str) -> dict:
    """One batch size in this (fresh) process: best wall time, CPU time and the peak memory the batch adds."""
    torch.manual_seed(0)
    features = build(model_cfg, stage).to(device)
    images = torch.rand(batch, 3, size, size, device=device)
    rss_before = _peak_rss_bytes()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times, cpu = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first forward is a warm-up
            start, start_cpu = time.perf_counter(), _cpu_seconds()
            out = features(images)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            cpu.append(_cpu_seconds() - start_cpu)
    best = min(times[1:])
    row = {"batch": batch, "size": size, "device": device, "feature_channels": out.shape[1],
           "feature_hw": list(out.shape[2:]), "feature_bytes": out.numel() * out.element_size(),
           "seconds_per_batch": best, "images_per_s": batch / best,
           "cpu_seconds_per_image": min(cpu[1:]) / batch, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        row["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
        row["peak_memory"] = "cuda max_memory_allocated minus the weights"
    else:
        row["peak_extra_bytes"] = _peak_rss_bytes() - rss_before
        row["peak_memory"] = "growth of peak RSS over the RSS after building the model"
    return row


class FullForward(torch.nn.Module):
    """The naive extractor: the whole UNet runs for every t and plain hooks keep the chosen layers."""

    def __init__(self, features) -> None:
        super().__init__()
        from distseg.models.denoiser import layer_module

        self.features, self.unet = features, features.unet
        self.plain = type(features.unet).from_config(features.unet.config).eval()
        self.plain.load_state_dict(features.unet.state_dict())
        self.kept: dict[int, torch.Tensor] = {}
        for layer in features.layers:
            layer_module(self.plain, layer).register_forward_hook(
                lambda m, i, out, index=layer.index: self.kept.__setitem__(index, out))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from distseg.models.denoiser import to_unet_range

        f, (b, _, h, w) = self.features, images.shape
        x0 = to_unet_range(images)
        noise = f.fixed_noise(h, w, images.device).expand_as(x0)
        size = (h // f.cfg.feature_stride, w // f.cfg.feature_stride)
        maps = []
        for step in f.cfg.timesteps:
            t = torch.full((b,), step, dtype=torch.long, device=images.device)
            self.plain(f.scheduler.add_noise(x0, noise, t), t)
            maps += [torch.nn.functional.interpolate(self.kept[layer.index], size=size, mode="bilinear",
                                                     align_corners=False) for layer in f.layers]
        return torch.cat(maps, 1)


def early_stop_vs_full(model_cfg: dict, stage: str | None, batch: int, size: int, repeats: int, device: str) -> dict:
    """Seconds per batch of the extractor and of the naive full forward, alternated; features must agree."""
    torch.manual_seed(0)
    features = build(model_cfg, stage).to(device)
    full = FullForward(features).to(device)
    images = torch.rand(batch, 3, size, size, device=device)
    best = {"early_stop": float("inf"), "full_forward": float("inf")}
    with torch.no_grad():
        reference = full(images)
        torch.testing.assert_close(features(images), reference)
        for _ in range(repeats):
            for name, fn in (("early_stop", features), ("full_forward", full)):
                start = time.perf_counter()
                fn(images)
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                best[name] = min(best[name], time.perf_counter() - start)
    return {"batch": batch, "size": size, **{f"{k}_seconds": v for k, v in best.items()},
            "speedup": best["full_forward"] / best["early_stop"]}


def child(args: argparse.Namespace) -> None:
    """Entry point of one measuring subprocess: print the row as JSON."""
    model_cfg = json.loads(Path(args.model_json).read_text())
    row = measure_batch(model_cfg, args.stage, args.child_batch, args.size, args.repeats, args.device)
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", help="a ddpm_head stage folder (its config and weights)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS / "ddpm_features"))
    parser.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_batch:
        return child(args)
    from rich.progress import track

    from distseg.engine import checkpoint as ckpt

    model_cfg = ckpt.read_stage(args.stage)["config"]["model"] if args.stage else recipe_config()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_json = out.with_suffix(".model.json")
    model_json.write_text(json.dumps(model_cfg))
    rows = []
    for batch in track([int(b) for b in args.batches.split(",")], description="batch sizes"):
        cmd = [sys.executable, __file__, "--child-batch", str(batch), "--model-json", str(model_json), "--size",
               str(args.size), "--repeats", str(args.repeats), "--device", args.device,
               "--threads", str(args.threads)] + (["--stage", args.stage] if args.stage else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]["images_per_s"]
    cache_gb = rows[0]["feature_bytes"] / rows[0]["batch"] * TRAIN_TILES / 1e9
    for row in rows:
        row["throughput_vs_batch1"] = row["images_per_s"] / base
    comparison = early_stop_vs_full(model_cfg, args.stage, int(args.batches.split(",")[-1]), args.size,
                                    args.repeats, args.device)
    result = {"model": model_cfg, "rows": rows, "early_stop_vs_full_forward": comparison,
              "feature_cache_gb_for_train_split": cache_gb,
              "feature_cache_note": f"computed, not measured: fp32 features of {TRAIN_TILES} tiles at {args.size}^2 "
                                    f"(what caching every pixel's features beforehand would hold)",
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    model_json.unlink()
    with out.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"batch {row['batch']:>3}: {row['images_per_s']:6.2f} images/s ({row['throughput_vs_batch1']:.2f}x "
              f"batch 1), {row['cpu_seconds_per_image']:.2f} CPU s/image, features {row['feature_bytes'] / 2**20:.0f} "
              f"MiB, peak +{row['peak_extra_bytes'] / 2**20:.0f} MiB")
    print(f"early stop vs full UNet forward (batch {comparison['batch']}): {comparison['speedup']:.2f}x faster")
    print(f"a feature cache of the {TRAIN_TILES} train tiles would hold {cache_gb:.1f} GB (computed)")
    print(f"saved {out.with_suffix('.json')} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
