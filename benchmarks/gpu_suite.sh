#!/usr/bin/env bash
# The GPU suite, sized for one lease: run each part as its own command (each keeps to its own
# 540 s deadline: GPU_SUITE_DEADLINE_S), from anywhere inside a plain copy of the tree (no
# install needed: the package is used in place through PYTHONPATH, the extension built in
# place only when it does not import yet):
#
#     SUITE=kernels OUT=/some/dir bash benchmarks/gpu_suite.sh   # env, build, op tests, op benchmarks
#     SUITE=train   OUT=/some/dir bash benchmarks/gpu_suite.sh   # env, build, compiled training steps
#     GPU_SUITE_DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu_suite.sh  # every step of both parts on the CPU
#
# Writes at most 6 files under $OUT (default ./gpu_out): results.jsonl (one JSON object per
# case, appended as soon as it is known), env.json, summary.txt, logs.tar.gz. Needs python with
# torch, triton, numpy, pillow and pytest (pytest-benchmark is not used; no opencv, no tqdm, no
# network). The steps and what each record holds: benchmarks/gpu_suite.py; the code, budgets
# included: benchmarks/suite/.
# Exit status: non-zero if a step failed or timed out (in a dry run also if one was skipped).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT" || exit 2
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

if [ "${GPU_SUITE_DRY_RUN:-0}" = 1 ]; then
    exec "$PYTHON" benchmarks/gpu_suite.py run --suite "${SUITE:-all}" --out "$OUT" --dry-run
fi
exec "$PYTHON" benchmarks/gpu_suite.py run --suite "${SUITE:-kernels}" --out "$OUT"
