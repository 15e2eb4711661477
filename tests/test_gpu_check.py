"""The GPU check (benchmarks/gpu_check.py) keeps working without a GPU: its CPU dry run fills every part with sane
figures, a part that overruns its limit is recorded as such, and the carried-wheels check finds what is missing."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402

BLOCKED = ("rasterio", "kornia", "diffusers")
"""Optional packages the check must run without (the GPU image lacks them)."""

_BLOCKER = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked: the GPU image does not have it", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every part, with the optional packages made unimportable in every process it starts."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(_BLOCKER)
    env = dict(__import__("os").environ, PYTHONPATH=str(tmp / "site"), OMP_NUM_THREADS="1")
    out = tmp / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=1500)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report, (out / "gpu_check.md").read_text(), out


@pytest.mark.slow
def test_the_dry_run_fills_every_part(dry_run):
    proc, report, md, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["dry_run"] and report["device"]["type"] == "cpu"
    assert list(report["parts"]) == list(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("log_tail"))
        assert 0 < part["seconds"] <= part["limit_s"] + 5
    assert "random" in report["weights"]
    required = {r["name"]: r for r in report["requirements"]}
    assert required["torch"]["ok"] and "rasterio" in required

    train = report["parts"]["train"]["items"]
    assert set(train) == {name for name, *_ in gpu_check.train_configs(gpu_check.DRY)}
    assert {i["compile"] for i in train.values()} == {True, False}
    for item in train.values():
        assert item["images_per_s"] > 0 and item["step_time_s"]["median"] > 0
        assert 0 <= item["data_wait_fraction"] <= 1 and item["peak_memory_gb"][0] > 0
        assert item["flops_per_step"] > 0 and item["tflops_per_gpu"] > 0
        assert item["mfu"] is None, "no MFU on CPU (no peak to compare with)"
    ssl, sup = train["hrnet_w48_psa.ssl.eager"], train["hrnet_w48_psa.supervised.eager"]
    assert ssl["unlabeled_images_per_s"] > 0 and sup["unlabeled_images_per_s"] is None
    assert ssl["flops_per_step"] > sup["flops_per_step"], "the SSL step adds teacher and unlabelled work"

    infer = report["parts"]["infer"]["items"]
    assert len(infer) == 2 * len(gpu_check.DRY.infer_batches)
    assert all(i["images_per_s"] > 0 and i["vs_study"] is None for i in infer.values())

    exact = report["parts"]["exact"]["items"]
    resume = exact["resume"]
    assert resume["verdict"] == "bit-identical" and resume["resumed_max_abs_diff"] == 0.0
    assert resume["finished_steps"] == [gpu_check.DRY.exact_steps] * 2
    assert resume["killed_after_checkpoint"] >= gpu_check.DRY.exact_kill_after and resume["resume_reported"]
    for op in ("ema", "pseudo_label", "class_thresholds"):
        assert exact[op]["max_abs_diff"] < 1e-5 and exact[op]["speedup"] > 0, op

    paths = report["parts"]["cuda_paths"]["items"]
    assert paths["fp16_loss_scaling"]["status"] == paths["fp16_stage"]["status"] == "skipped"
    assert paths["sync_batchnorm"]["converted"] == 0 < paths["sync_batchnorm"]["batchnorm_layers"]
    assert list(paths["pytest_gpu"]["test_predict_cuda"].values()) == ["skipped"]

    assert md.startswith("# GPU check (dry run on CPU")
    for heading in ("## 1. Training step", "## 2. Inference", "## 3. Exactness", "## 4. CUDA-only paths"):
        assert heading in md
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert len(records) == len(train) + len(infer) and {r["tag"] for r in records} == {"gpu_check"}


def test_a_part_over_its_limit_is_recorded_and_the_budget_is_shared(tmp_path):
    record = gpu_check.run_part("exact", 2.0, tmp_path / "out", tmp_path, dry_run=True)
    assert record["status"] == "timeout" and record["returncode"] is None and record["seconds"] < 30
    assert "log_tail" in record
    limit = gpu_check.plan_limits(["infer", "exact", "train"], 100.0, {"infer": 20.0, "exact": 30.0})
    assert limit("infer", 0.0) == 20.0
    assert limit("exact", 5.0) == 30.0
    assert limit("train", 40.0) == 60.0, "the uncapped part gets what the others left"
    assert limit("infer", 90.0) == 0.0, "never the time reserved for the parts still to come"
    compiled = gpu_check.train_configs(gpu_check.FULL, ("compile",))
    assert len(compiled) == 4 and {mode for _, _, mode, _ in compiled} == {"compile"}
    assert compiled[0][0] == "efficientnet_lite0.ssl.compile", "the quick compile first"


def _wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                                 for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_the_wheel_check_names_what_the_gpu_machine_would_miss(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_wheels, "CARRIED", ("alpha", "beta"))
    _wheel(tmp_path, "alpha", "1.0", ["beta>=2", "torch", "gamma; extra == 'docs'", "winlib; sys_platform == 'win32'"])
    _wheel(tmp_path, "beta", "2.5", ["delta<1"])
    assert gpu_wheels.problems(tmp_path) == ["beta needs delta<1: neither carried nor in the GPU image"]
    _wheel(tmp_path, "delta", "0.5", [], tag="cp311-cp311-manylinux_2_17_x86_64")
    wrong_python = "delta-0.5-cp311-cp311-manylinux_2_17_x86_64.whl: no tag for CPython 3.12 on Linux x86_64"
    assert gpu_wheels.problems(tmp_path) == [wrong_python]
    (tmp_path / "delta-0.5-cp311-cp311-manylinux_2_17_x86_64.whl").unlink()
    _wheel(tmp_path, "delta", "0.5", [], tag="cp312-cp312-manylinux_2_17_x86_64")
    assert gpu_wheels.problems(tmp_path) == []
    _wheel(tmp_path, "beta", "1.0", [], tag="py2.py3-none-any")
    assert any(f.startswith("beta is carried twice") for f in gpu_wheels.problems(tmp_path))
    monkeypatch.setattr(gpu_wheels, "CARRIED", ("alpha", "beta", "epsilon"))
    assert "epsilon: no wheel (run `make gpu-wheels`)" in gpu_wheels.problems(tmp_path)
