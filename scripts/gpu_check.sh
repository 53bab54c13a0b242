#!/usr/bin/env bash
# Run ON a GPU machine, from the repository root, after scripts/gpu_wheels.sh has filled .gpu/
# here (the device tool: carry [".gpu"], command `bash scripts/gpu_check.sh`). Installs the project
# onto that machine's own torch from the carried wheels (nothing is fetched, its torch is not
# touched), unpacks MNIST, then runs, each step time-boxed within BUDGET_S in all:
#   test    the GPU tests (python -m pytest -m gpu)
#   epochs  s/epoch of a solo MNIST job at batch 64 and 512
#   jobs    jobs per minute of 8 solo MNIST jobs under hydra/launcher=parallel, jobs_per_gpu 1 vs 4
#   bench   python -m benchmarks.bench --pack-sizes 1 8 64 256 (member-epochs/s against solo jobs)
# Everything goes to $OUT (summary.md, figures.json, log.txt, pytest.xml, bench/*.json).
# PY: the machine's python with torch; STEPS: which steps (all by default); GPU_DIR: the wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
GPU_DIR=${GPU_DIR:-.gpu}
STEPS=${STEPS:-install data test epochs jobs bench}
BUDGET_S=${BUDGET_S:-480}  # 8 minutes: the device tool allows 600 s a command
WORK=$(mktemp -d /tmp/gpu_check.XXXX)
mkdir -p "$OUT"
LOG=$OUT/log.txt
START=$(date +%s)
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HYDRA_FULL_ERROR=1
SITE=$WORK/site
export PY GPU_DIR WORK SITE
: >"$OUT/steps.tsv"

say() { echo "== $*" | tee -a "$LOG"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME SECONDS CMD...: CMD's output to the log, cut at SECONDS or where the budget ends.
step() {
  local name=$1 box=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  ((box > left)) && box=$left
  if ((box < 15)); then
    say "$name: skipped, the budget of ${BUDGET_S}s is spent"
    printf '%s\tskipped\t0\n' "$name" >>"$OUT/steps.tsv"
    return 1
  fi
  say "$name (at most ${box}s): $*"
  local t0=$SECONDS
  # bash -c: a step may be one of the functions below (exported).
  timeout --kill-after=10 "$box" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1
  local rc=$?
  local how=$([[ $rc == 0 ]] && echo ok || ([[ $rc == 124 || $rc == 137 ]] && echo "timed out" || echo "failed ($rc)"))
  say "$name: $how after $((SECONDS - t0))s"
  printf '%s\t%s\t%s\n' "$name" "$how" $((SECONDS - t0)) >>"$OUT/steps.tsv"
  return $rc
}

# The carried wheels in a folder of their own on PYTHONPATH, and src/ beside it; the machine's own
# packages (torch) stay as they are. A wheel is left out where the machine has that package at
# its version or newer; an older one it shadows. No resolver: pip's, asked to fit the wheels to
# everything installed there, was still backtracking after 5 minutes in a copy of that setup here.
install_wheels() {
  rm -rf "$SITE"
  local wheels
  wheels=$("$PY" - "$GPU_DIR/wheels" <<'PYEOF'
import importlib.metadata as md, sys
from pathlib import Path
from packaging.utils import parse_wheel_filename
from packaging.version import Version

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version, *_ = parse_wheel_filename(wheel.name)
    try:
        there = Version(md.version(name))
    except md.PackageNotFoundError:
        there = None
    if there is not None and there >= version:
        print(f"kept the machine's {name} {there} (carried: {version})", file=sys.stderr)
    else:
        print(wheel)
PYEOF
  ) || return 1
  # setuptools: only a build needs it, and none is run here.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    $(grep -v /setuptools- <<<"$wheels") || return 1
  PYTHONPATH=$SITE:$PWD/src "$PY" -m pip check || true # told, not fatal: the tests say more
}

import_check() {
  "$PY" -c 'import torch, actlab.train, hydra_plugins.actlab_parallel, wandb, submitit
ok = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "GPU:", torch.cuda.get_device_name(0) if ok else None)'
}

unpack() {
  mkdir -p data/mnist
  for f in "$GPU_DIR"/data/mnist/*.gz; do gunzip -c "$f" >"data/mnist/$(basename "$f" .gz)"; done
  "$PY" -m actlab.data # checks the MD5s
}
export -f install_wheels import_check unpack

if wants install; then
  step install 90 install_wheels
  export PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  step import 60 import_check
fi

if wants data; then
  step data 90 unpack
fi

if wants test; then
  step test 180 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml"
fi

JOB=(data=mnist logger=csv trainer=gpu callbacks.progress_bar.refresh_rate=0)
if wants epochs; then
  for b in 64 512; do
    step "epochs-b$b" 60 "$PY" train.py "${JOB[@]}" "data.batch_size=$b" trainer.max_epochs=3 \
      "hydra.run.dir=$WORK/epochs-b$b"
  done
fi

if wants jobs; then
  for k in 1 4; do
    t0=$(date +%s.%N)
    step "jobs-per-gpu-$k" 90 "$PY" train.py -m "${JOB[@]}" hydra/sweeper=basic \
      hydra/launcher=parallel "launch.jobs_per_gpu=$k" "seed=range(0,8)" trainer.max_epochs=1 \
      "hydra.sweep.dir=$WORK/jobs-per-gpu-$k" &&
      echo "$k $t0 $(date +%s.%N)" >>"$WORK/jobs.txt"
  done
fi

# Last: the longest. Cut short, it writes no JSON, but the log keeps each way's rate as it ends.
if wants bench; then
  # --main-job-rounds 0: the main job's rounds (whole processes, 10 epochs each) do not fit here.
  step bench 240 "$PY" -m benchmarks.bench --rounds 0 --startup-rounds 0 --main-job-rounds 0 \
    --sweep-epochs 0 --pack-sizes 1 8 64 256 --out "$OUT/bench"
fi

# The summary: what ran, how it went, the figures.
"$PY" - "$OUT" "$WORK" <<'EOF' | tee -a "$LOG"
import json, shutil, subprocess, sys
from pathlib import Path

out, work = Path(sys.argv[1]), Path(sys.argv[2])
fig = {}
try:
    import torch

    fig["torch"] = torch.__version__
    fig["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible"
except Exception as e:  # noqa: BLE001 -- the summary says what it could not read
    fig["device"] = f"torch does not import: {e}"
if shutil.which("nvidia-smi"):
    query = ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    fig["nvidia-smi"] = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True).stdout.strip()
fig["steps"] = [dict(zip(("step", "result", "seconds"), l.split("\t")))
                for l in (out / "steps.tsv").read_text().splitlines()]
junit = out / "pytest.xml"
if junit.exists():
    import xml.etree.ElementTree as ET

    root = ET.parse(junit).getroot()
    s = root if root.find("testsuite") is None else root.find("testsuite")
    fig["gpu tests"] = {k: s.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}
for b in (64, 512):
    r = work / f"epochs-b{b}" / "results.json"
    if r.exists():
        rec = json.loads(r.read_text())
        fig[f"solo MNIST batch {b}"] = {"status": rec.get("status"),
                                        "s/epoch": rec.get("seconds_per_epoch"),
                                        "test/acc": rec.get("metrics", {}).get("test/acc"),
                                        "device": rec.get("device")}
jobs = work / "jobs.txt"
for line in jobs.read_text().splitlines() if jobs.exists() else []:
    k, t0, t1 = line.split()
    recs = [json.loads(p.read_text()) for p in (work / f"jobs-per-gpu-{k}").glob("*/results.json")]
    done = sum(r.get("status") == "finished" for r in recs)
    fig[f"jobs_per_gpu={k}"] = {"jobs finished": done, "wall_s": round(float(t1) - float(t0), 1),
                                "jobs/min": round(60 * done / (float(t1) - float(t0)), 1)}
bench = sorted((out / "bench").glob("*.json"))
if bench:
    packs = json.loads(bench[-1].read_text()).get("pack_sizes", {})
    fig["pack sizes"] = packs
    if "pack K=64" in packs and "one job per config" in packs:
        k64, solo = (packs[k]["member_epochs_per_s_wall"] for k in ("pack K=64", "one job per config"))
        fig["pack K=64 / one job per config (target >= 20)"] = round(k64 / solo, 1)
(out / "figures.json").write_text(json.dumps(fig, indent=2))
lines = ["# GPU check", ""]
for k, v in fig.items():
    if k not in ("steps", "pack sizes"):
        lines.append(f"- {k}: {v}")
lines += ["", "| step | result | s |", "| --- | --- | --- |"]
lines += [f"| {s['step']} | {s['result']} | {s['seconds']} |" for s in fig["steps"]]
for name, p in fig.get("pack sizes", {}).items():
    if isinstance(p, dict):
        fit = p["member_epochs_per_s_fit"]
        lines.append(f"- {name}: {p['jobs']} jobs, {p['member_epochs_per_s_wall']:.2f} "
                     f"member-epochs/s by wall time, {'-' if fit is None else f'{fit:.2f}'} by fit time")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
rm -f "$OUT/steps.tsv"
say "done in $(($(date +%s) - START))s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
