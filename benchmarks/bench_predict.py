"""Sliding-window prediction on CPU: throughput (overlap, TTA) and peak memory vs raster size.

Part 1 times a small CNN on an in-memory image with 0 % and 25 % overlap, with and without flip TTA,
and prints megapixels/s with the slowdown relative to the plain run. Part 2 writes synthetic
GeoTIFFs of growing size (lazily, strip by strip), predicts each one in a fresh subprocess and
records that process's peak RSS: streaming by window keeps it flat while the raster grows.
Results go to benchmarks/results/predict.json.

    python benchmarks/bench_predict.py [--sizes 2048,5120,10240,20480] [--throughput-size 1024]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distseg.data.classes import ClassMap
from distseg.predict import PredictConfig, predict_array, predict_file

RESULTS = Path(__file__).resolve().parent / "results" / "predict.json"
NUM_CLASSES = 6


class SmallSegNet(torch.nn.Module):
    """A stride-4 encoder with a bilinear decoder (~15k parameters): the compute of a tiny segmenter."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.body(x), size=x.shape[2:], mode="bilinear", align_corners=False)


def class_map() -> ClassMap:
    return ClassMap.from_dict({"classes": [{"name": f"class{i}", "value": i} for i in range(NUM_CLASSES)]})


def throughput(size: int, tile: int, repeats: int) -> list[dict]:
    """Megapixels/s of the small CNN for each (overlap, TTA) setting, best of ``repeats``."""
    torch.manual_seed(0)
    model = SmallSegNet().eval()
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    rows = []
    for overlap in (0.0, 0.25):
        for tta in (False, True):
            cfg = PredictConfig(tile=tile, overlap=overlap, tta=tta, batch_size=4)
            best = min(_timed(lambda: predict_array(model, image, NUM_CLASSES, cfg)) for _ in range(repeats))
            rows.append({"overlap": overlap, "tta": tta, "seconds": best, "mpix_per_s": size * size / 1e6 / best})
    base = rows[0]["mpix_per_s"]
    for row in rows:
        row["slowdown_vs_plain"] = base / row["mpix_per_s"]
    return rows


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_raster(path: Path, size: int) -> None:
    """A size × size RGB GeoTIFF written strip by strip (smooth pattern, so it compresses well)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32640", transform=from_origin(500000, 2800000, 0.3, 0.3), tiled=True,
                       compress="deflate", BIGTIFF="IF_SAFER") as dst:
        cols = np.arange(size)
        for y in range(0, size, 256):
            rows = np.arange(y, min(y + 256, size))[:, None]
            bands = [(rows * 7 + cols * k) // 97 % 256 for k in (3, 5, 11)]
            dst.write(np.stack(bands).astype(np.uint8), window=Window(0, y, size, len(rows)))


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM restarts at exec; ru_maxrss would also count the
    parent's memory at the fork that started this subprocess, so it is only the fallback."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(raster: str, out: str, tile: int) -> None:
    """Subprocess body: predict one raster with a 1×1 conv and print the peak RSS in MiB."""
    import rasterio  # noqa: F401  (loaded before the baseline is taken, so GDAL's libraries count there)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, NUM_CLASSES, 1)
    cfg = PredictConfig(tile=tile, overlap=0.25, batch_size=8, color=False)
    baseline = peak_rss_mib()  # interpreter, torch, rasterio
    start = time.perf_counter()
    predict_file(model, class_map(), raster, out, cfg, progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    print(json.dumps({"peak_rss_mib": peak, "baseline_rss_mib": baseline, "prediction_rss_mib": peak - baseline,
                      "seconds": seconds}))


def memory_vs_size(sizes: list[int], tile: int) -> list[dict]:
    """Peak RSS of a fresh process predicting each raster size."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            raster = Path(tmp) / f"r{size}.tif"
            write_raster(raster, size)
            proc = subprocess.run([sys.executable, __file__, "--memory-worker", str(raster), str(Path(tmp) / "out"),
                                   "--tile", str(tile)], capture_output=True, text=True, check=True)
            stats = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"size": size, "megapixels": size * size / 1e6,
                         "decoded_input_mib": size * size * 3 / 2**20, **stats})
            print(f"  {size:>6} px ({size * size / 1e6:5.0f} MP): peak RSS {stats['peak_rss_mib']:.0f} MiB, "
                  f"{stats['prediction_rss_mib']:.0f} MiB above the imports, {stats['seconds']:.1f} s", flush=True)
            raster.unlink()
            for f in (Path(tmp) / "out").iterdir():
                f.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,5120,10240,20480", help="raster sides for the memory test")
    parser.add_argument("--throughput-size", type=int, default=1024, help="image side for the throughput test")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-worker", nargs=2, metavar=("RASTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(*args.memory_worker, args.tile)
        return
    torch.set_num_threads(1)
    print(f"throughput, {args.throughput_size}² image, tile {args.tile}, 1 thread:")
    speed = throughput(args.throughput_size, args.tile, args.repeats)
    for r in speed:
        print(f"  overlap {r['overlap']:.2f} tta {str(r['tta']):5}: {r['mpix_per_s']:6.2f} MP/s "
              f"({r['slowdown_vs_plain']:.2f}x the time of overlap 0, no TTA)")
    print("peak memory vs raster size (1x1 conv, overlap 0.25, fresh process each):")
    memory = memory_vs_size([int(s) for s in args.sizes.split(",")], args.tile)
    growth = memory[-1]["peak_rss_mib"] / memory[0]["peak_rss_mib"]
    pixels = memory[-1]["megapixels"] / memory[0]["megapixels"]
    print(f"  raster grew {pixels:.0f}x in pixels, peak RSS grew {growth:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"throughput": speed, "memory": memory, "rss_growth": growth,
                                   "pixel_growth": pixels, "torch": torch.__version__}, indent=2) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
