#!/usr/bin/env bash
# Run HERE (a machine that reaches the package registry), from the repository root, before a GPU
# check: fills .gpu/ with what scripts/gpu_check.sh installs on a GPU machine that reaches no
# registry and has its own Python 3.12, torch, Lightning, numpy, pandas, matplotlib, tensorboard:
#   .gpu/wheels/      every other package the project needs, and theirs, as CPython 3.12
#                     manylinux x86_64 wheels (a package published only as an sdist is built here)
#   .gpu/data/mnist/  MNIST's IDX files, gzipped
# The device tool carries at most 64 MiB of ignored paths: the script prints the total and fails
# above it. Usage: scripts/gpu_wheels.sh   (PY: a python with pip, whose installed versions are
# the ones taken; MNIST: the folder of the IDX files; PYVER: the GPU machine's Python; GPU_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MNIST=${MNIST:-data/mnist}
export PYVER=${PYVER:-3.12}
OUT=${GPU_DIR:-.gpu}
LIMIT_MIB=64

rm -rf "$OUT" && mkdir -p "$OUT/wheels" "$OUT/data/mnist"

# The dependency closure, walked from pyproject.toml through each wheel's METADATA (markers read
# for Python 3.12 on Linux x86_64), leaving out what the GPU machine's image holds already.
"$PY" - "$OUT/wheels" <<'EOF'
import importlib.metadata as md
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

wheels = Path(sys.argv[1])
# In the device's image (the device tool's KINDS.md), big, and used as they are there.
DEVICE = {
    "torch", "torchvision", "lightning", "pytorch-lightning", "torchmetrics", "numpy", "scipy",
    "pandas", "matplotlib", "tensorboard", "triton", "pytest",
}  # fmt: skip
PYVER = os.environ["PYVER"]
TARGET = {
    **default_environment(),
    "python_version": PYVER, "python_full_version": f"{PYVER}.0", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
}  # fmt: skip
PIP = [sys.executable, "-m", "pip", "-q"]
PLATFORM = ["--only-binary=:all:", "--python-version", PYVER, "--implementation", "cp"]
for n in (17, 24, 27, 28, 31, 34, 35, 39):  # pip matches manylinux_2_N exactly
    PLATFORM += ["--platform", f"manylinux_2_{n}_x86_64"]
PLATFORM += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"]


def fetch(req: Requirement) -> Path:
    """The wheel of `req`, as the version installed here where it satisfies `req`."""
    try:
        here = md.version(req.name)
        spec = f"{req.name}=={here}" if req.specifier.contains(here, prereleases=True) else None
    except md.PackageNotFoundError:
        spec = None
    spec = spec or f"{req.name}{req.specifier}"
    before = set(wheels.iterdir())
    args = ["--no-deps", "-d", str(wheels), spec]
    if subprocess.run([*PIP, "download", *PLATFORM, *args]).returncode != 0:
        print(f"{spec}: no wheel for CPython {PYVER} manylinux; building one here", flush=True)
        subprocess.run([*PIP, "wheel", "-w", str(wheels), "--no-deps", spec], check=True)
    (new,) = set(wheels.iterdir()) - before
    return new


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({**TARGET, "extra": ""})]


project = tomllib.loads(Path("pyproject.toml").read_text())
todo = [Requirement(r) for r in project["project"]["dependencies"]]
todo += [Requirement(r) for r in project["build-system"]["requires"]]  # pip install -e . builds
done: dict[str, str] = {}
while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    if name in DEVICE or name in done:
        continue
    wheel = fetch(req)
    done[name] = str(parse_wheel_filename(wheel.name)[1])
    todo += requirements(wheel)
print(f"{len(done)} wheels: " + " ".join(f"{n}=={v}" for n, v in sorted(done.items())))
EOF

for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  gzip -9 -c "$MNIST/$f" >"$OUT/data/mnist/$f.gz"
done
du -sh "$OUT/wheels" "$OUT/data"
# What travels: the tracked files and the carried folder.
bytes=$(($(git ls-files -z | xargs -0 cat | wc -c) + $(find "$OUT" -type f -print0 | xargs -0 cat | wc -c)))
total=$((bytes / 1048576))
echo "$OUT and the tracked files: $total MiB (the device tool carries at most $LIMIT_MIB MiB)"
((total < LIMIT_MIB)) || { echo "error: over $LIMIT_MIB MiB: carry fewer wheels" >&2; exit 1; }
