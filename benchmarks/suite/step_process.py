"""One step in its own process: a Context that runs its sub-steps under the deadline and records
each, the STEPS table, and run_step (what `gpu_suite.py step NAME` runs)."""
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from . import BENCHMARKS, ROOT
from .op_steps import step_ceilings, step_graphs, step_ops
from .records import Recorder, last_line, where
from .setup_steps import step_env, step_extension, step_tests
from .train_steps import step_train


class Context:
    def __init__(self, args):
        self.dry = args.dry_run
        self.out, self.logs = Path(args.out), Path(args.logs)
        self.deadline_at = args.deadline_at
        self.rec = Recorder(args.out, args.run, args.part, args.step, self.dry, args.started_at)
        self.device = "cpu" if self.dry else "cuda"
        self.current = None

    def remaining(self):
        return self.deadline_at - time.time()

    def sub(self, name, estimate, fn, **fields):
        """Run sub-step `fn` (returns a dict of fields) if `estimate` seconds are left; record it."""
        if self.remaining() < estimate:
            self.rec.write(sub=name, status="skipped", budget_s=estimate, remaining_s=round(self.remaining(), 1),
                           reason=f"{self.remaining():.0f} s left, needs ~{estimate} s", **fields)
            return None
        self.current = name
        t0 = time.time()
        try:
            result = fn() or {}
        except Exception as exc:
            traceback.print_exc()
            self.rec.write(sub=name, status="failed", seconds=round(time.time() - t0, 1), error=last_line(exc),
                           where=where(exc), **fields)
            return None
        finally:
            self.current = None
        result = dict(fields, **result)
        status = result.pop("status", "ok")
        self.rec.write(sub=name, status=status, seconds=round(time.time() - t0, 1), **result)
        return result


def dry_run_compile():
    """Dry runs: torch.compile(..., mode=M) becomes torch.compile(..., backend="aot_eager")."""
    import functools

    import torch

    original = torch.compile

    @functools.wraps(original)
    def compile_aot_eager(model=None, **kwargs):
        kwargs.pop("mode", None)
        kwargs.pop("options", None)
        kwargs["backend"] = "aot_eager"
        return original(model, **kwargs) if model is not None else original(**kwargs)

    torch.compile = compile_aot_eager


STEPS = {
    "env": step_env, "extension": step_extension, "tests": step_tests, "ops": step_ops,
    "graphs": step_graphs, "ceilings": step_ceilings, "ops_compiled": lambda ctx: step_ops(ctx, compiled=True),
    "train_stage0": lambda ctx: step_train(ctx, 0), "train_stage1": lambda ctx: step_train(ctx, 1),
    "train_stage2": lambda ctx: step_train(ctx, 2),
}


def run_step(args):
    sys.path[:0] = [p for p in (str(ROOT), str(BENCHMARKS)) if p not in sys.path]
    ctx = Context(args)

    def terminated(signum, frame):  # the deadline's backstop, or the driver stopped: say where, then go
        ctx.rec.write(sub=ctx.current or "body", status="killed", reason=f"stopped by signal {signum}")
        os._exit(124)

    signal.signal(signal.SIGTERM, terminated)
    if ctx.dry and args.step not in ("env", "extension", "tests"):
        dry_run_compile()
    try:
        STEPS[args.step](ctx)
    except Exception as exc:
        traceback.print_exc()
        ctx.rec.write(sub=ctx.current or "body", status="failed", error=last_line(exc), where=where(exc))
    sys.stdout.flush()
    os._exit(1 if ctx.rec.failed else 0)  # skip interpreter teardown (CUDA, compile workers)
