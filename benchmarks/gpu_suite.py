"""The GPU suite's driver: one lease, two parts, one deadline each, results kept as they come.

    python benchmarks/gpu_suite.py run --suite kernels|train|all --out DIR [--dry-run]
    (benchmarks/gpu_suite.sh calls this; `step NAME` is how the driver runs each step.)

This file is the command line; the suite itself is the package benchmarks/suite/ (its
docstring lists the modules): budgets.py holds the parts, steps and budgets below.

Each part keeps to ONE deadline (GPU_SUITE_DEADLINE_S, default 540 s from its start). Before a
step, when the time left (less RESERVE_S for the summary and the archive) is below the step's
budget, the step is skipped and recorded as skipped. Each step runs in its own process (a
crash or a poisoned CUDA context ends that step only) under coreutils `timeout` capped to the
time left, so the deadline, not the lease, is what stops a step. Steps that hold state between
checks (a compiled trainer) check the deadline again before each sub-step.

Under $OUT (at most MAX_OUT_FILES files): results.jsonl (one JSON object per case, appended
and flushed the moment it is known, so a killed run keeps everything measured), env.json,
summary.txt and logs.tar.gz (every step's log and the pytest junit XML; rewritten after each
step). Every record carries run, part, step, sub (the case), status (ok, failed, skipped,
timeout: stopped at the deadline, killed: the driver itself was stopped) and dry_run.

Parts and steps, most telling first; budgets in seconds on an H200 (dry run in brackets):

    kernels  env 15 [20]  extension 150 [90]  tests 120 [60]  ops 60 [45]  graphs 40 [20]
             ceilings 15 [15]  ops_compiled 90 [45]
    train    env 15 [20]  extension 150 [90]  train_stage1 240+20+15+45 [70+10+10+30]
             train_stage2 240+20+15+45 [60+10+10+30]  train_stage0 90+20 [45+10]

* env: env.json (torch, triton, CUDA, cuDNN, card, capability, memory, driver, numpy/pytest,
  the git commit or, without .git, a digest of the tree's sources: `tree_digest`).
* extension: imports confeti_fast._C (and _C_cuda) from this tree; builds them in place only
  when they do not import (`setup.py build_ext --inplace`, FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0;
  CPU only in a dry run).
* tests: the op test files (TEST_FILES): the fused-op equivalence tests (fp32 and bf16 on
  CUDA), with each op's reference checks and the extension ops' opcheck; junit XML in the archive.
* ops: eager reference and fused, at the paper's shapes in bf16 + channels_last under bf16
  autocast (as a training step runs them): median / min wall ms, first call, peak extra memory, launches (one call under
  `confeti_fast.profiling.count_launches`), speed-up over the eager reference.
* graphs: one call captured in a CUDA graph (after warm-up on a side stream); the replay time
  approximates pure kernel time, wall minus replay is host cost (a reference that does not
  capture, e.g. the contrast reference's host read of `kept.any()`, is recorded as unsupported).
* ceilings: device copy bandwidth (1 GiB copy_, read + write bytes) and the bf16 matmul rate
  (8192^3).
* ops_compiled: torch.compile(reference) (the prototype update's reference has
  data-dependent shapes: recorded as skipped, with why); speed-ups of the fused op over it.
* train_stageN (1, 2, then 0): a Trainer at paper shapes (ResNetV1c-101, 512 / 640 crops, CUT
  with 64 channels) on a synthetic batch past every gate: sub "compile" runs two compiled steps
  with an evaluation between them and records dynamo's counts after the first step, during
  the evaluation and during the second step (did the second step compile anything?); sub
  "sync" runs one more step, then one under torch.cuda.set_sync_debug_mode("error"); subs
  "bench_fast" and "bench_reference" time the fast step and the reference step (fp32, eager,
  reference kernels) and give the speed-up and the MFU (the reference step's FLOPs from
  torch.utils.flop_counter over the fast step's median, against the card's dense bf16 peak).
  Stage 2's compile budget becomes stage 1's measured compile time once that is known.

Counting compilations (robust from torch 2.11 to 2.14): suite/dynamo_counts.py.

Dry run (--dry-run, GPU_SUITE_DRY_RUN=1 in the .sh): every step on the CPU at tiny shapes, with
CUDA hidden: the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (the CUDA
dispatch's fused op, called on CPU tensors; bf16 + channels_last under autocast, as on the GPU),
torch.compile's backend is aot_eager (dynamo still traces, so the compile counts mean
the same; inductor's CPU C++ build would take minutes here), CUDA graphs and the sync-debug
mode are replaced by plain calls; each such record says `"dry_run": true` and what was
substituted.
"""
import argparse
import os
import sys

from suite.budgets import DEADLINE_S, PARTS
from suite.orchestrator import Orchestrator
from suite.step_process import STEPS, run_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a part (or both) of the suite")
    run.add_argument("--suite", choices=(*PARTS, "all"), default="kernels")
    run.add_argument("--out", required=True)
    run.add_argument("--dry-run", action="store_true")
    run.add_argument("--deadline", type=float, default=float(os.environ.get("GPU_SUITE_DEADLINE_S", DEADLINE_S)),
                     help="seconds per part (default 540)")
    run.add_argument("--steps", help="comma-separated subset of the part's steps (tests of the driver)")
    step = sub.add_parser("step", help="(internal) one step, in its own process")
    step.add_argument("step", choices=sorted(STEPS))
    for name in ("--out", "--logs", "--run", "--part"):
        step.add_argument(name, required=True)
    step.add_argument("--started-at", type=float, required=True)
    step.add_argument("--deadline-at", type=float, required=True)
    step.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "step":
        return run_step(args)
    steps = args.steps.split(",") if args.steps else None
    return Orchestrator(args.out, args.suite, args.dry_run, args.deadline, steps).main()


if __name__ == "__main__":
    sys.exit(main())
