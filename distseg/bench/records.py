"""Benchmark records: one JSON object per run, appended as a line to ``<out_dir>/bench.jsonl``.

Every record says where it was measured (device, driver, library versions, git revision) and with what
(the resolved config and its hash), so figures from different clusters and commits can be compared.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RECORDS_FILE = "bench.jsonl"

# Fields every training or inference record carries (the report reads them).
FIGURES = ("images_per_s", "images_per_s_per_gpu", "step_time_s", "data_wait_fraction", "peak_memory_gb",
           "flops_per_step", "tflops_per_gpu", "peak_tflops", "mfu")


def config_hash(config: Any) -> str:
    """First 12 hex digits of the SHA-256 of the config's canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform module reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device) -> dict[str, Any]:
    """Name, type, driver and CUDA runtime of the device a run measured (CPU: its model and core count)."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                "driver": _driver_version(), "cuda": torch.version.cuda, "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": _cpu_name(), "memory_gb": None, "driver": None, "cuda": None,
            "count": os.cpu_count(), "threads": torch.get_num_threads()}


def versions() -> dict[str, str | None]:
    """Versions of the libraries that decide the speed of a step."""
    import torch

    from distseg import __version__

    found: dict[str, str | None] = {"distseg": __version__, "torch": torch.__version__,
                                    "python": platform.python_version()}
    for name in ("deepspeed", "timm"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


def base_record(kind: str, config: dict[str, Any], device) -> dict[str, Any]:
    """The provenance part of a record; the caller adds the figures."""
    from distseg.engine.checkpoint import git_revision

    return {"kind": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": device_info(device), "versions": versions(), "git_rev": git_revision(),
            "config_hash": config_hash(config), "config": config}


def append_record(out_dir: str | Path, record: dict[str, Any]) -> Path:
    """Append ``record`` as one JSON line; a single ``write`` of one line keeps concurrent appends whole."""
    path = Path(out_dir) / RECORDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    return path


def read_records(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Records from ``.jsonl`` files, or from every ``bench*.jsonl`` in the given folders (records collected from
    several nodes can sit side by side as bench-node1.jsonl, ...), in file order.

    A malformed line raises ValueError naming the file and line number.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("bench*.jsonl")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such records file or folder")
    records = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON record: {exc}") from exc
            if not isinstance(record, dict) or "kind" not in record:
                raise ValueError(f"{path}:{number}: not a benchmark record (no 'kind')")
            records.append(record)
    return records
