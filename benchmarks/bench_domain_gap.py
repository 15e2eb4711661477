"""Does the domain-gap ranking predict which intermediate domain pays? MKD gain over SKD on controlled candidates.

The target is the synthetic "target" domain with few labels; each candidate intermediate domain is
``distseg.data.synthetic.interpolate(t)`` for a distance t between the target (t = 0) and the "intermediate" domain
(t = 1). For every seed one recipe runs, through ``distseg run``, the single-stage chain (SKD: start model -> target)
and one multi-stage chain per candidate (MKD: start model -> candidate -> target: head, distil, head, distil, each
hop as in ``distseg/recipes/demo.yaml``, students initialised from their teacher as in ``dubai_10pct.yaml``), and
evaluates each on the target's test split. ``distseg domain-gap``
ranks the candidates from the data alone (and once more with LogME on the seed-0 candidate models). The benchmark
reports the Spearman correlation between predicted closeness (minus the ranking score) and the measured MKD gain
(MKD mIoU minus SKD mIoU of the same seed, averaged over seeds), with the per-candidate table.

Everything is CPU-sized (timm's test ResNet, 64-px tiles, tens of steps per stage); finished stages are skipped on a
rerun, so an interrupted benchmark resumes. Results go to benchmarks/results/domain_gap.{json,csv}.

    python benchmarks/bench_domain_gap.py [--work runs/bench_domain_gap] [--seeds 0,1]
        [--distances 0,0.2,0.4,0.6,0.8,1] [--threads 1]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import time
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = {"backbone": "test_resnet", "psa": "parallel", "aspp_channels": 64, "decoder_channels": 64}
"""The demo's model: a tiny timm ResNet with a slim head."""
TARGET = {"images": 60, "split": "4:1:3", "labeled_fraction": 0.25}
"""60 scenes of 128 px (240 tiles of 64 px): 30 labelled train tiles, 90 unlabelled, 30 val, 90 test."""
CANDIDATE_IMAGES = 40
"""Scenes per candidate (160 tiles; 8:1:1 by scene, about 128 labelled train tiles)."""


def make_data(work: Path, distances: list[float]) -> tuple[Path, dict[float, Path]]:
    """Generate and shard the target and one candidate per distance (skipped when already there)."""
    from distseg.data.shard import shard_dataset
    from distseg.data.synthetic import interpolate, write_dataset

    def build(name: str, domain, n: int, seed: int, **split) -> Path:
        out = work / "shards" / name
        if (out / "manifest.json").is_file():
            return out
        raw = write_dataset(work / "raw" / name, n, 128, domain=domain, seed=seed)
        shard_dataset(out, images=raw / "images", masks=raw / "masks", classes=raw / "classes.yaml", tile=64,
                      seed=0, force=True, **split)
        return out

    target = build("target", "target", TARGET["images"], 0, split=TARGET["split"],
                   labeled_fraction=TARGET["labeled_fraction"])
    candidates = {t: build(f"t{t:.2f}", interpolate(t), CANDIDATE_IMAGES, 100 + i, split="8:1:1")
                  for i, t in enumerate(distances)}
    return target, candidates


def chain_recipe(path: Path, target: Path, candidates: dict[float, Path], seed: int, init: Path) -> Path:
    """One recipe per seed: SKD and one MKD chain per candidate, each evaluated on the target's test split."""
    datasets = {"target": str(target), **{f"c{i}": str(p) for i, p in enumerate(candidates.values())}}
    stages = [{"name": "skd_teacher", "kind": "head", "data": "target", "weights": str(init)},
              {"name": "skd", "kind": "distill", "data": "target", "parent": "skd_teacher"},
              {"name": "eval_skd", "kind": "eval", "data": "target", "parent": "skd", "label": "SKD"}]
    for i, t in enumerate(candidates):
        stages += [{"name": f"c{i}_teacher", "kind": "head", "data": f"c{i}", "weights": str(init)},
                   {"name": f"c{i}_student", "kind": "distill", "data": f"c{i}", "parent": f"c{i}_teacher",
                    "overrides": {"train": {"steps": 100}}},
                   {"name": f"mkd{i}_teacher", "kind": "head", "data": "target", "parent": f"c{i}_student"},
                   {"name": f"mkd{i}", "kind": "distill", "data": "target", "parent": f"mkd{i}_teacher"},
                   {"name": f"eval_mkd{i}", "kind": "eval", "data": "target", "parent": f"mkd{i}",
                    "label": f"MKD t={t:.2f}"}]
    recipe = {"name": f"domain_gap_seed{seed}", "launcher": "python", "nproc": 1,
              "ds_config": "ds_configs/cpu_fp32.json", "model": MODEL, "figure_tiles": 0, "datasets": datasets,
              "defaults": {"global_batch": 8, "micro_batch": 8, "optim": {"lr": 0.02, "warmup_steps": 5},
                           "loss": {"kind": "ohem"},
                           "train": {"steps": 50, "log_every": 10, "eval_batch_size": 16, "fisher_batches": 1,
                                     "seed": seed},
                           "data": {"stream": {"num_workers": 0, "augment": {"crop_size": 64}}}},
              "kind_defaults": {"head": {"train": {"steps": 15}},
                                # students start from their teacher (as in recipes/dubai_10pct.yaml): with no
                                # ImageNet weights offline, a fresh student would carry nothing across a hop
                                "distill": {"distill": {"init_from_teacher": True}}},
              "stages": stages}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def start_weights(path: Path, seed: int) -> Path:
    """A freshly initialised model (the offline stand-in for ImageNet weights), one per seed."""
    if path.is_file():
        return path
    import torch

    from distseg.models import ModelConfig, build_model
    from distseg.models.weights import save_weights

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(build_model(ModelConfig(**MODEL, num_classes=6)), path, {"kind": "random-init"})
    return path


def run_seed(work: Path, target: Path, candidates: dict[float, Path], seed: int) -> dict[str, float]:
    """Run (or resume) one seed's recipe; row label -> test mIoU."""
    from distseg.pipeline import run_recipe

    init = start_weights(work / f"init_seed{seed}.safetensors", seed)
    recipe = chain_recipe(work / f"recipe_seed{seed}.yaml", target, candidates, seed, init)
    result = run_recipe(recipe, out=str(work / f"seed{seed}"))
    return {row.label: row.miou for row in result["rows"]}


def rank_candidates(target: Path, candidates: dict[float, Path], models: list[str] | None, threads: int):
    """The domain-gap analysis of the candidates (with LogME when candidate models are given)."""
    from distseg.analysis.gap import GapConfig, analyse

    cfg = GapConfig(target=str(target), candidates=[str(p) for p in candidates.values()], size=64, tiles=500,
                    candidate_models=models or [], threads=threads, embed_tiles=0)
    return analyse(cfg)


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def summarise(distances: list[float], miou: dict[int, dict[str, float]], gap, gap_logme) -> dict:
    """Per-candidate table and the correlations of every predictor with the mean MKD gain."""
    names = list(gap.measures)  # candidate display names in distance order
    rows = []
    for t, name in zip(distances, names):
        gains = [miou[s][f"MKD t={t:.2f}"] - miou[s]["SKD"] for s in miou]
        m, ml = gap.measures[name], gap_logme.measures[name]
        rows.append({"distance": t, "candidate": name, "rank": gap.ranking.order.index(name) + 1,
                     "score": gap.ranking.score[name], "score_with_logme": gap_logme.ranking.score[name],
                     **{k: m[k] for k in ("fd", "mmd", "mmd_p", "color", "texture", "labels")}, "logme": ml["logme"],
                     **{f"mkd_miou_seed{s}": miou[s][f"MKD t={t:.2f}"] for s in miou},
                     **{f"skd_miou_seed{s}": miou[s]["SKD"] for s in miou},
                     **{f"gain_seed{s}": g for s, g in zip(miou, gains)}, "gain": sum(gains) / len(gains)})
    gain = [r["gain"] for r in rows]
    predictors = {"ranking score (distances only)": [-r["score"] for r in rows],
                  "ranking score with LogME": [-r["score_with_logme"] for r in rows],
                  "true distance t": [-r["distance"] for r in rows],
                  **{f"{k} alone": [-r[k] for r in rows] for k in ("fd", "mmd", "color", "texture")},
                  "label overlap alone": [r["labels"] for r in rows], "LogME alone": [r["logme"] for r in rows]}
    rho = {k: spearman(v, gain) for k, v in predictors.items()}
    per_seed = {s: spearman(predictors["ranking score (distances only)"], [r[f"gain_seed{s}"] for r in rows])
                for s in miou}
    return {"rows": rows, "spearman": rho, "spearman_per_seed": per_seed, "driver": gap.ranking.driver,
            "driver_share": gap.ranking.driver_share}


def save(summary: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "domain_gap.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(RESULTS / "domain_gap.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary["rows"][0]))
        writer.writeheader()
        writer.writerows(summary["rows"])


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the stage processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench_domain_gap"), help="data, recipes and run folders")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--distances", default="0,0.2,0.4,0.6,0.8,1")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process (stages inherit it)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start, cpu0 = time.perf_counter(), cpu_seconds()
    distances = [float(d) for d in args.distances.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work.resolve()
    target, candidates = make_data(work, distances)
    miou = {s: run_seed(work, target, candidates, s) for s in seeds}
    chains_cpu = cpu_seconds() - cpu0
    gap_start, gap_cpu = time.perf_counter(), cpu_seconds()
    gap = rank_candidates(target, candidates, None, args.threads)
    models = [str(work / f"seed{seeds[0]}" / f"c{i}_student") for i in range(len(candidates))]
    gap_logme = rank_candidates(target, candidates, models, args.threads)
    summary = summarise(distances, miou, gap, gap_logme)
    summary.update(seeds=seeds, distances=distances, threads=args.threads,
                   domain_gap={"wall_s": time.perf_counter() - gap_start, "cpu_s": cpu_seconds() - gap_cpu,
                               "tiles_per_s": gap.timing["tiles_per_s"], "tiles": gap.timing["tiles"]},
                   total={"wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu0,
                          "chains_cpu_s": chains_cpu})
    save(summary)
    for r in summary["rows"]:
        print(f"t={r['distance']:.2f}  rank {r['rank']}  score {r['score']:.3f}  gain {100 * r['gain']:+.2f}")
    for k, v in summary["spearman"].items():
        print(f"spearman({k}, gain) = {v:+.3f}")
    print(f"total {summary['total']['wall_s']:.0f} s wall, {summary['total']['cpu_s']:.0f} s CPU")


if __name__ == "__main__":
    main()
