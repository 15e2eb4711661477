"""The wheels ``benchmarks/gpu_check.sh`` installs on a GPU machine that can fetch nothing (``make gpu-wheels``).

The GPU image the check is written for has Python 3.12 with PyTorch, timm, typer, rich, safetensors, pyyaml,
numpy, pillow, matplotlib and tensorboard (:data:`IMAGE_PACKAGES`). What distseg needs beyond that travels as
wheels for CPython 3.12 on manylinux x86_64, at the versions installed here (the versions the test suite ran):

    python benchmarks/gpu_wheels.py build .whl    # download (and build DeepSpeed's pure-Python wheel) into .whl/
    python benchmarks/gpu_wheels.py check .whl    # every requirement of every wheel is carried or in the image

``check`` reads each wheel's ``Requires-Dist`` (markers evaluated for Python 3.12 on Linux x86_64, extras left
out) and fails, listing what is missing, when a requirement is neither carried at a matching version nor in the
image, when a project is carried twice, when a wheel cannot install on CPython 3.12 x86_64, or when the folder
outgrows :data:`MAX_BYTES`.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

CARRIED = ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
           "typing-extensions", "webdataset", "braceexpand")
"""Projects the check needs that the GPU image lacks (typing-extensions: pydantic needs a newer one than images
tend to hold; on the path first, it shadows the image's own)."""
BUILT = ("deepspeed",)
"""Published as source only: built here into a pure-Python wheel (its CUDA ops compile on first use, and distseg
uses none of them: the optimizer is PyTorch's)."""
IMAGE_PACKAGES = frozenset(canonicalize_name(n) for n in (
    "torch", "torchvision", "timm", "numpy", "pillow", "rich", "typer", "pyyaml", "safetensors", "matplotlib",
    "tensorboard", "einops", "msgpack", "ninja", "packaging", "psutil", "py-cpuinfo", "tqdm", "nvidia-ml-py",
    "huggingface-hub", "pytest", "pytest-timeout", "scikit-image", "scikit-learn", "scipy"))
"""What the GPU image already holds, by name (its versions are read there, in gpu_check.json's requirements)."""
LAZY = frozenset({"rasterio"})
"""distseg dependencies that the check never imports (GeoTIFF reading), so the image may lack them."""
TARGET = {"interpreters": {"py3", "py2", "cp312"}, "abis": {"none", "abi3", "cp312"}}
MAX_BYTES = 32 * 2**20
"""The carried folder travels with the repository in one request; keep it well under the transfer limit."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
"""Marker environment of the GPU image, for evaluating ``Requires-Dist`` markers."""


def pinned(names: tuple[str, ...] = CARRIED) -> list[str]:
    """``name==version`` for each project, at the version installed in this environment."""
    try:
        return [f"{name}=={md.version(name)}" for name in names]
    except md.PackageNotFoundError as exc:
        raise SystemExit(f"gpu_wheels: {exc.name} is not installed here; run `make install` first") from None


def build(folder: Path) -> None:
    """Fill ``folder`` with one wheel per carried project (older files of those projects are removed first)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip"]
    binary = [p for p in pinned() if p.split("==")[0] not in BUILT]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(folder), *binary], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder),
                    *pinned(BUILT)], check=True)


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) read from a wheel's ``*.dist-info/METADATA``."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = Parser().parsestr(zf.read(name).decode())
    return meta["Name"], meta["Version"], meta.get_all("Requires-Dist") or []


def installable(path: Path) -> bool:
    """Whether one of the wheel's tags installs on CPython 3.12, Linux x86_64."""
    _, _, _, tags = parse_wheel_filename(path.name)
    return any(t.interpreter in TARGET["interpreters"] and t.abi in TARGET["abis"]
               and (t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64")))
               for t in tags)


def problems(folder: Path) -> list[str]:
    """Everything that would stop the carried wheels from installing and importing there (empty: complete)."""
    wheels = sorted(folder.glob("*.whl"))
    found: list[str] = []
    carried: dict[str, str] = {}
    requires: list[tuple[str, str]] = []
    for path in wheels:
        name, version, reqs = wheel_metadata(path)
        key = canonicalize_name(name)
        if key in carried:
            found.append(f"{key} is carried twice ({carried[key]} and {version}): pip refuses the install")
        carried[key] = version
        if not installable(path):
            found.append(f"{path.name}: no tag for CPython 3.12 on Linux x86_64")
        requires += [(name, r) for r in reqs]
    for project in CARRIED:
        if canonicalize_name(project) not in carried:
            found.append(f"{project}: no wheel (run `make gpu-wheels`)")
    for owner, text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(ENVIRONMENT):
            continue
        key = canonicalize_name(req.name)
        if key in carried:
            if not req.specifier.contains(carried[key], prereleases=True):
                found.append(f"{owner} needs {text}; {key} {carried[key]} is carried")
        elif key not in IMAGE_PACKAGES:
            found.append(f"{owner} needs {text}: neither carried nor in the GPU image")
    size = sum(p.stat().st_size for p in wheels)
    if size > MAX_BYTES:
        found.append(f"{folder}: {size / 2**20:.1f} MiB of wheels, over {MAX_BYTES / 2**20:.0f} MiB")
    return found


def distseg_gaps(carried: set[str]) -> list[str]:
    """distseg's own dependencies that are neither carried, nor in the image, nor imported lazily by the check."""
    import tomllib

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    gaps = []
    for text in deps["dependencies"]:
        key = canonicalize_name(Requirement(text).name)
        if key not in carried and key not in IMAGE_PACKAGES and key not in LAZY:
            gaps.append(f"distseg needs {text}: neither carried nor in the GPU image")
    return gaps


def check(folder: Path) -> int:
    found = problems(folder)
    found += distseg_gaps({canonicalize_name(wheel_metadata(p)[0]) for p in folder.glob("*.whl")})
    for line in found:
        print(f"gpu_wheels: {line}", file=sys.stderr)
    if not found:
        size = sum(p.stat().st_size for p in folder.glob("*.whl")) / 2**20
        print(f"gpu_wheels: {folder} is complete ({len(list(folder.glob('*.whl')))} wheels, {size:.1f} MiB)")
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("build", "check"))
    parser.add_argument("folder", type=Path, nargs="?", default=Path(".whl"))
    args = parser.parse_args(argv)
    if args.action == "build":
        build(args.folder)
    return check(args.folder)


if __name__ == "__main__":
    sys.exit(main())
