"""The GPU suite behind benchmarks/gpu_suite.py (its docstring says what each step measures):

    budgets.py        the parts, their steps, each step's budget, the deadline and the rounds
    records.py        results.jsonl: the Recorder, reading records back, error lines, atomic writes
    summary.py        summary.txt from the records
    orchestrator.py   the driver: one child process per step under the deadline, the log archive
    step_process.py   a step's process: Context (sub-steps under the deadline), the STEPS table
    setup_steps.py    steps env (env.json, tree_digest), extension (import or build), tests (pytest)
    op_steps.py       steps ops, ops_compiled, graphs (CUDA-graph replay) and ceilings
    train_steps.py    steps train_stage0/1/2: compile, sync and the fast / reference step timings
    dynamo_counts.py  dynamo's compile, recompile and graph-break counts between two points

The driver never imports torch: the step modules import it (and cases, train_cases, timing)
inside the steps, which run in their own processes.
"""
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
ROOT = BENCHMARKS.parent
DRIVER = BENCHMARKS / "gpu_suite.py"
