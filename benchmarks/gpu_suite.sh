#!/usr/bin/env bash
# GPU check suite: environment report, build of the compiled extension (CPU + CUDA), the
# tests with CUDA variants (models, CUT, the fused ops against the reference in fp32 and
# bf16) and the op benchmarks at paper shapes. (The segmentor step benchmark,
# benchmarks/test_segmentor_step.py, compiles for ~90 s per variant: run it on its own.)
# Run from anywhere inside the repo on a GPU box:
#
#     OUT=/some/dir bash benchmarks/gpu_suite.sh        # OUT defaults to ./gpu_out
#     SUITE=train OUT=/some/dir bash benchmarks/gpu_suite.sh
#
# SUITE picks the part after the build: `kernels` (default: the op tests and benchmarks, at
# most 8 minutes on an H100), `train` (the fast-path tests, including a whole step under
# torch.cuda.set_sync_debug_mode("error"), and the end-to-end stage-1/stage-2 step benchmark at
# paper shapes with MFU; about 8 minutes, most of it torch.compile), or `all` (both, ~15).
#
# Needs torch (CUDA build), nvcc, triton, pytest and pytest-benchmark; no internet, and no
# opencv/tqdm: only tests that import neither at module level run here.
# Everything goes under $OUT: env.txt, *.log, tests.xml, bench_ops.json, bench_summary.txt,
# summary.txt. A failing step does not stop the later ones; the exit
# status is non-zero at the end if any step failed. Budget: at most 8 minutes on an H100:
# the steps' timeouts (build 150 s, tests 180 s, benchmarks 120 s) add up to 7.5 minutes.
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
# In place, so PYTHONPATH=$ROOT finds confeti_fast/_C*.so and _C_cuda*.so.
note "building the extension in place (CPU + CUDA, sm_90)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8}
timeout -k 10 150 "$PYTHON" setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1
record build_ext $?
tail -3 "$OUT/build_ext.log" | tee -a "$OUT/suite.log"
"$PYTHON" -c "from confeti_fast.kernels import contrast, patch_nce, proto_update as p
print('extension: cpu', p.AVAILABLE, '| cuda', p.CUDA_AVAILABLE, '|', p.LOAD_ERROR)
print('triton kernels:', contrast.AVAILABLE, patch_nce.AVAILABLE, contrast.LOAD_ERROR or '')" 2>&1 | tee -a "$OUT/suite.log"

SUITE=${SUITE:-kernels}
note "suite: $SUITE"
run_kernels() { [ "$SUITE" = kernels ] || [ "$SUITE" = all ]; }
run_train() { [ "$SUITE" = train ] || [ "$SUITE" = all ]; }

# ---------------------------------------------------------------- tests (CUDA variants run here)
if run_kernels; then
TESTS="tests/test_models.py tests/test_cut.py tests/test_proto_update_op.py tests/test_triton_kernels.py tests/test_ops_switch.py tests/test_ops_reference.py"
note "pytest $TESTS"
timeout -k 10 180 "$PYTHON" -m pytest $TESTS -q -rs -p no:cacheprovider \
    --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
record tests $?

# ---------------------------------------------------------------- benchmarks
note "pytest benchmarks/test_ops.py -k cuda --benchmark-only"
timeout -k 10 120 "$PYTHON" -m pytest benchmarks/test_ops.py -k cuda --benchmark-only -q -rs -p no:cacheprovider \
    --benchmark-json="$OUT/bench_ops.json" 2>&1 | tee "$OUT/bench_ops.log"
record bench_ops $?
fi

# ---------------------------------------------------------------- the training step
if run_train; then
note "generating the demo data (the end-to-end benchmark builds its datasets from it)"
timeout -k 10 120 "$PYTHON" -c "from confeti_fast.data.demo import ensure_demo; ensure_demo(progress=False)" \
    > "$OUT/demo.log" 2>&1
record demo_data $?
note "pytest tests/test_fast_path.py (a CUDA step without host sync; the bf16 step against fp32)"
timeout -k 10 240 "$PYTHON" -m pytest tests/test_fast_path.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT/tests_train.xml" 2>&1 | tee "$OUT/tests_train.log"
record tests_train $?
note "pytest benchmarks/test_train_step.py -k cuda --benchmark-only"
timeout -k 10 420 "$PYTHON" -m pytest benchmarks/test_train_step.py -k cuda --benchmark-only -q -rs \
    -p no:cacheprovider --benchmark-json="$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log"
record bench_train $?
fi
"$PYTHON" - "$OUT"/bench_*.json <<'PY' 2>&1 | tee "$OUT/bench_summary.txt"
import json, sys
for path in sys.argv[1:]:
    try:
        data = json.load(open(path))
    except (OSError, ValueError) as err:
        print(f"{path}: unreadable ({err})")
        continue
    for b in data["benchmarks"]:
        s, e = b["stats"], b["extra_info"]
        mem = e.get("peak_extra_mb", e.get("peak_allocated_mb", e.get("peak_memory_mb", e.get("peak_rss_mb"))))
        ratios = ", ".join(f"{k} {v}x" for k, v in e.items() if k.startswith(("speedup", "memory_vs")))
        if "mfu_bf16" in e:
            ratios += f", MFU {100 * e['mfu_bf16']:.1f}% of bf16 peak ({e['step_tflop']} TFLOP/step)"
        print(f"{b['name']}: median {s['median'] * 1e3:.3f} ms (min {s['min'] * 1e3:.3f}, {s['rounds']} rounds), "
              f"peak mem {mem} MB, {ratios or 'no ratio'}, {e.get('device_name')}")
PY

# ---------------------------------------------------------------- summary
{
    for line in "${STATUS[@]}"; do echo "$line"; done
    if [ "$FAILED" -eq 0 ]; then echo "ALL OK"; else echo "SOME STEPS FAILED"; fi
} | tee "$OUT/summary.txt" | tee -a "$OUT/suite.log"
exit "$FAILED"
