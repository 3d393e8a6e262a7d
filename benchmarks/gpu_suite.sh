#!/usr/bin/env bash
# GPU check suite for the segmentor: environment report, model tests with CUDA, and the
# training-step benchmark at paper shapes. Run from anywhere inside the repo on a GPU box:
#
#     OUT=/some/dir bash benchmarks/gpu_suite.sh        # OUT defaults to ./gpu_out
#
# Needs torch (CUDA build), pytest and pytest-benchmark; no internet, and no opencv/tqdm:
# only the tests with CUDA variants (test_models.py, test_cut.py) and benchmarks/ run, and
# they import neither at module level.
# Everything goes under $OUT: env.txt, *.log, test_models.xml, bench_segmentor.json,
# summary.txt. A failing step does not stop the later ones; the exit status is non-zero
# at the end if any step failed. Budget: about 6 minutes on an H100.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
STATUS=()    # "step: ok|FAILED (rc N)|skipped"
FAILED=0

note() { echo "[gpu_suite $(date +%H:%M:%S)] $*" | tee -a "$OUT/suite.log"; }
record() {  # record <step> <rc>
    if [ "$2" -eq 0 ]; then STATUS+=("$1: ok"); else STATUS+=("$1: FAILED (rc $2)"); FAILED=1; fi
    note "$1 -> rc $2"
}
: > "$OUT/suite.log"

# ---------------------------------------------------------------- environment
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "repo: $ROOT"
    echo "python: $PYTHON ($("$PYTHON" --version 2>&1))"
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
    else
        echo "card: none (nvidia-smi not found)"
    fi
    "$PYTHON" - <<'PY' 2>&1
import importlib, platform
import torch
print("torch:", torch.__version__, "| cuda:", torch.version.cuda, "| cudnn:", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(),
      "| device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
print("cpu:", platform.processor() or platform.machine(), "| capability:", torch.backends.cpu.get_cpu_capability(),
      "| threads:", torch.get_num_threads())
for name in ("triton", "numpy", "pytest", "pytest_benchmark", "cv2", "tqdm"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'present')}")
    except Exception as err:
        print(f"{name}: MISSING ({type(err).__name__})")
PY
    echo
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi 2>&1; fi
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$OUT/suite.log"
note "environment written to $OUT/env.txt"

# ---------------------------------------------------------------- install (only if needed)
# Used in place through PYTHONPATH; install only when that does not import.
if "$PYTHON" -c "import confeti_fast.models" >>"$OUT/suite.log" 2>&1; then
    note "confeti_fast imports in place (PYTHONPATH=$ROOT), no install"
elif [ -f setup.py ] || [ -f pyproject.toml ]; then
    note "confeti_fast does not import in place; pip install -e . (no deps, no network)"
    "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e . 2>&1 | tee "$OUT/install.log"
    record install $?
else
    note "confeti_fast does not import and there is nothing to install"
    record install 1
fi
# The model tests and benchmarks must not pull opencv/tqdm in at import time.
"$PYTHON" - <<'PY' 2>&1 | tee -a "$OUT/suite.log"
import sys
import torch  # noqa: F401  (torch itself may import tqdm)
before = {m for m in ("cv2", "tqdm") if m in sys.modules}
import confeti_fast.models  # noqa: F401
heavy = [m for m in ("cv2", "tqdm") if m in sys.modules and m not in before]
print("confeti_fast.models imports beyond torch's:", heavy or "no cv2/tqdm")
PY

# ---------------------------------------------------------------- build the extension
# There is no compiled extension yet. When setup.py gains ext_modules, build it in place here.
if [ -f setup.py ] && grep -q "ext_modules" setup.py; then
    note "building the extension in place"
    "$PYTHON" setup.py build_ext --inplace 2>&1 | tee "$OUT/build_ext.log"
    record build_ext $?
else
    note "build the extension: skipped (setup.py defines no ext_modules)"
    STATUS+=("build_ext: skipped (no ext_modules)")
fi

# ---------------------------------------------------------------- model tests (CUDA variants run here)
note "pytest tests/test_models.py tests/test_cut.py"
timeout -k 15 200 "$PYTHON" -m pytest tests/test_models.py tests/test_cut.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT/test_models.xml" 2>&1 | tee "$OUT/test_models.log"
record test_models $?

# ---------------------------------------------------------------- benchmarks
note "pytest benchmarks --benchmark-only"
timeout -k 15 330 "$PYTHON" -m pytest benchmarks --benchmark-only -q -rs -p no:cacheprovider \
    --benchmark-json="$OUT/bench_segmentor.json" 2>&1 | tee "$OUT/bench.log"
record benchmarks $?

if [ -f "$OUT/bench_segmentor.json" ]; then
    "$PYTHON" - "$OUT/bench_segmentor.json" <<'PY' 2>&1 | tee "$OUT/bench_summary.txt"
import json, sys
data = json.load(open(sys.argv[1]))
for b in data["benchmarks"]:
    s, e = b["stats"], b["extra_info"]
    mem = e.get("peak_memory_mb", e.get("peak_rss_mb"))
    print(f"{b['name']}: median {s['median'] * 1e3:.1f} ms (min {s['min'] * 1e3:.1f}, {s['rounds']} rounds), "
          f"first step {e.get('first_step_s')} s, peak mem {mem} MB, speedup vs fp32 {e.get('speedup_vs_fp32', '-')}, "
          f"{e.get('device_name')}")
PY
fi

# ---------------------------------------------------------------- summary
{
    for line in "${STATUS[@]}"; do echo "$line"; done
    if [ "$FAILED" -eq 0 ]; then echo "ALL OK"; else echo "SOME STEPS FAILED"; fi
} | tee "$OUT/summary.txt" | tee -a "$OUT/suite.log"
exit "$FAILED"
