"""The GPU suite's driver: one lease, two parts, one deadline each, results kept as they come.

    python benchmarks/gpu_suite.py run --suite kernels|train|all --out DIR [--dry-run]
    (benchmarks/gpu_suite.sh calls this; `step NAME` is how the driver runs each step.)

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

Counting compilations (robust from torch 2.11 to 2.14): `torch._dynamo.utils.counters`
("frames"/"ok": frames dynamo converted; "stats"/"unique_graphs": FX graphs compiled;
"graph_break": breaks by reason; "inductor"/"cudagraph_skips": graphs that fell back from
CUDA graphs), and `torch._dynamo.utils.get_compilation_metrics()` (one entry per frame
compile): a recompile is an entry whose `recompile_reason` is set (the reason is recorded),
or, where that field is missing, whose compile id "frame/n" has n > 0.

Dry run (--dry-run, GPU_SUITE_DRY_RUN=1 in the .sh): every step on the CPU at tiny shapes, with
CUDA hidden: the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (the CUDA
dispatch's fused op, called on CPU tensors; bf16 + channels_last under autocast, as on the GPU),
torch.compile's backend is aot_eager (dynamo still traces, so the compile counts mean
the same; inductor's CPU C++ build would take minutes here), CUDA graphs and the sync-debug
mode are replaced by plain calls; each such record says `"dry_run": true` and what was
substituted.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEADLINE_S = 540
RESERVE_S = 15        # kept back for the summary and the archive
KILL_GRACE_S = 5      # `timeout -k`: SIGTERM, then SIGKILL this much later
MAX_OUT_FILES = 6
OUT_FILES = ("results.jsonl", "env.json", "summary.txt", "logs.tar.gz")
TEST_FILES = ("tests/test_op_contrast.py", "tests/test_op_patch_nce.py", "tests/test_op_proto_update.py")

# step -> (budget on an H200, budget in a dry run) in seconds
BUDGETS = {
    "env": (15, 20), "extension": (150, 90), "tests": (120, 60), "ops": (60, 45), "graphs": (40, 20),
    "ceilings": (15, 15), "ops_compiled": (90, 45),
    "train_stage1": (240, 70), "train_stage2": (240, 60), "train_stage0": (90, 45),
}
SUB_BUDGETS = {"sync": (20, 10), "bench_fast": (15, 10), "bench_reference": (45, 30)}
PARTS = {
    "kernels": ("env", "extension", "tests", "ops", "graphs", "ceilings", "ops_compiled"),
    "train": ("env", "extension", "train_stage1", "train_stage2", "train_stage0"),
}
ROUNDS = {False: (50, 5), True: (3, 1)}          # ops: (timed, warm-up) by dry run
TRAIN_ROUNDS = {False: (10, 3), True: (2, 0)}    # training steps


# ============================================================================ shared bits

def budget(step, dry):
    table = BUDGETS if step in BUDGETS else SUB_BUDGETS
    return table[step][1 if dry else 0]


def last_line(exc):
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def where(exc, limit=4):
    """The innermost frames of exc's traceback that are in this repository (file:line fn)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if str(ROOT) in f.filename]
    return [f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}" for f in frames[-limit:]]


class Recorder:
    """Appends one JSON object per line to results.jsonl, flushed and closed at once."""

    def __init__(self, out, run, part, step, dry, started_at):
        self.path = Path(out) / "results.jsonl"
        self.common = {"run": run, "part": part, "step": step, "dry_run": dry}
        self.started_at = started_at
        self.failed = False

    def write(self, **fields):
        record = dict(self.common, **fields)
        record["elapsed_s"] = round(time.time() - self.started_at, 1)
        if record.get("status") in ("failed", "timeout", "killed"):
            self.failed = True
        line = json.dumps(record, default=str) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
        print(f"[gpu_suite] {line.strip()[:400]}", flush=True)
        return record


def read_records(out, run=None):
    records = []
    try:
        lines = (Path(out) / "results.jsonl").read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if run is None or record.get("run") == run:
            records.append(record)
    return records


def tree_digest(root=ROOT):
    """sha1 over the sources (path and bytes of every .py/.cpp/.cu/.h/.sh under the package,
    kernels/, csrc/, configs/, benchmarks/, tests/, setup.py): identifies a tree without .git."""
    import hashlib

    digest = hashlib.sha1()
    root = Path(root)
    files = [root / "setup.py"]
    for folder in ("confeti_fast", "kernels", "csrc", "configs", "benchmarks", "tests"):
        files += [p for p in (root / folder).rglob("*") if p.suffix in (".py", ".cpp", ".cu", ".h", ".cuh", ".sh")
                  and "__pycache__" not in p.parts]
    for path in sorted(p for p in files if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ============================================================================ the orchestrator

class Orchestrator:
    def __init__(self, out, suite, dry, deadline_s, steps=None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dry, self.deadline_s = dry, deadline_s
        self.parts = list(PARTS) if suite == "all" else [suite]
        self.only = set(steps) if steps else None
        self.run = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        self.logs = Path(tempfile.mkdtemp(prefix="gpu_suite_logs."))
        self.status = []  # (part, step, status, seconds, note)
        self.child = None
        self.current = None  # (recorder, step, start) while a step runs

    def remaining(self, deadline_at):
        return deadline_at - time.time() - RESERVE_S

    def estimate(self, step):
        """The step's budget; stage 2's becomes stage 1's measured compile time once known."""
        estimate = budget(step, self.dry)
        if step == "train_stage2":
            measured = [r.get("seconds") for r in read_records(self.out, self.run)
                        if r.get("step") == "train_stage1" and r.get("sub") == "compile" and r.get("status") == "ok"]
            if measured and measured[-1]:
                estimate = max(30, round(1.1 * measured[-1]))
        return estimate

    def run_part(self, part):
        started = time.time()
        deadline_at = started + self.deadline_s
        rec = Recorder(self.out, self.run, part, "part", self.dry, started)
        rec.write(sub="start", status="ok", deadline_s=self.deadline_s, steps=list(PARTS[part]),
                  budgets={s: self.estimate(s) for s in PARTS[part]})
        for step in PARTS[part]:
            if self.only is not None and step not in self.only:
                continue
            self.run_step(part, step, started, deadline_at)
        rec.write(sub="end", status="ok", seconds=round(time.time() - started, 1))

    def run_step(self, part, step, started, deadline_at):
        rec = Recorder(self.out, self.run, part, step, self.dry, started)
        estimate, remaining = self.estimate(step), self.remaining(deadline_at)
        if remaining < estimate:
            rec.write(sub="step", status="skipped", budget_s=estimate, remaining_s=round(remaining, 1),
                      reason=f"{remaining:.0f} s left before the deadline, the step needs ~{estimate} s")
            self.status.append((part, step, "skipped", 0.0, f"needs ~{estimate} s, {remaining:.0f} s left"))
            self.finish()
            return
        cap = int(remaining - KILL_GRACE_S)
        command = [sys.executable, str(Path(__file__).resolve()), "step", step, "--out", str(self.out),
                   "--logs", str(self.logs), "--run", self.run, "--part", part,
                   "--started-at", str(started), "--deadline-at", str(deadline_at - RESERVE_S)]
        if self.dry:
            command.append("--dry-run")
        if shutil.which("timeout"):
            command = ["timeout", "-k", str(KILL_GRACE_S), str(cap)] + command
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        if self.dry:
            env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        log = self.logs / f"{part}.{step}.log"
        t0 = time.time()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(command)}\n")
            f.flush()
            # its own process group (`timeout` makes one too): a kill of this driver takes it along
            self.child = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                          start_new_session=True)
            self.current = (rec, step, t0)
            try:
                rc = self.child.wait(timeout=cap + 2 * KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                self.kill_child()
                rc = 124
            finally:
                self.child = None
        self.current = None
        seconds = round(time.time() - t0, 1)
        status = "ok" if rc == 0 else ("timeout" if rc in (124, 137, -9, -15) else "failed")
        fields = {}
        if status != "ok":
            fields["log_tail"] = log.read_text(errors="replace").splitlines()[-6:]
        rec.write(sub="step", status=status, rc=rc, seconds=seconds, budget_s=estimate, cap_s=cap, **fields)
        self.status.append((part, step, status, seconds, f"rc {rc}" if rc else ""))
        self.finish()

    def kill_child(self):
        """SIGTERM to the step's process group (it records which case it was in), SIGKILL 3 s later."""
        child = getattr(self, "child", None)
        if child is None or child.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            try:
                os.killpg(child.pid, sig)
            except OSError:
                child.send_signal(sig)
            try:
                child.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def finish(self):
        """Rewrite summary.txt and logs.tar.gz (each through a temporary name, then renamed)."""
        try:
            write_atomic(self.out / "summary.txt", summary_text(read_records(self.out, self.run), self.status).encode())
        except Exception as exc:  # a summary bug must not lose the archive
            print(f"[gpu_suite] summary failed: {last_line(exc)}", file=sys.stderr)
        part = self.out / "logs.tar.gz.part"
        with tarfile.open(part, "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        os.replace(part, self.out / "logs.tar.gz")

    def main(self):
        def terminated(signum, frame):
            self.kill_child()
            if self.current is not None:  # the step that was running when this driver was stopped
                rec, step, t0 = self.current
                self.current = None
                rec.write(sub="step", status="killed", seconds=round(time.time() - t0, 1),
                          reason=f"the driver got signal {signum}")
                self.status.append((rec.common["part"], step, "killed", round(time.time() - t0, 1), f"signal {signum}"))
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, terminated)
        signal.signal(signal.SIGINT, terminated)
        code = 0
        try:
            for part in self.parts:
                self.run_part(part)
        finally:
            self.finish()
            files = sorted(str(p.relative_to(self.out)) for p in self.out.rglob("*") if p.is_file())
            extra = [f for f in files if f not in OUT_FILES]
            print(f"[gpu_suite] {len(files)} files under {self.out}: {', '.join(files)}", flush=True)
            if len(files) > MAX_OUT_FILES:
                print(f"[gpu_suite] ERROR: more than {MAX_OUT_FILES} files under $OUT ({extra})", file=sys.stderr)
                code = 1
            shutil.rmtree(self.logs, ignore_errors=True)
        bad = [s for s in self.status if s[2] != "ok" and (s[2] != "skipped" or self.dry)]
        print((self.out / "summary.txt").read_text(), flush=True)
        return 1 if bad or code else 0


def write_atomic(path, data):
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)


def _ms(value):
    return "-" if value is None else f"{value:.3f}"


def summary_text(records, status):
    lines = [f"gpu_suite summary ({'DRY RUN, CPU stand-ins' if any(r.get('dry_run') for r in records) else 'GPU'})", ""]
    lines.append("steps:")
    for part, step, state, seconds, note in status:
        lines.append(f"  {part:8s} {step:14s} {state:8s} {seconds:7.1f} s  {note}")
    env = next((r for r in records if r.get("step") == "env" and r.get("sub") == "env"), None)
    if env:
        lines += ["", f"env: {env.get('device_name')} | torch {env.get('torch')} | triton {env.get('triton')} | "
                      f"cuda {env.get('cuda')} | "
                      + (f"commit {env['commit']}" if env.get("commit") else f"tree digest {env.get('tree_digest')}")]
    ops = {}
    for r in records:
        if r.get("step") in ("ops", "ops_compiled") and r.get("status") == "ok" and r.get("impl"):
            ops.setdefault(r["op"], {})[r["impl"]] = r
    graphs = {(r.get("op"), r.get("impl")): r for r in records if r.get("step") == "graphs" and r.get("status") == "ok"}
    if ops:
        lines += ["", "ops (median wall ms; replay = CUDA-graph replay, ~kernel time):",
                  f"  {'op':13s} {'reference':>10s} {'compiled':>10s} {'fused':>10s} {'x eager':>8s} "
                  f"{'x compiled':>10s}"
                  f" {'launches':>8s} {'replay':>8s} {'peak MB':>8s}"]
        for op, impls in ops.items():
            ref, comp, fused = (impls.get(k, {}).get("median_ms") for k in ("reference", "compiled", "fused"))
            vs_eager = f"{ref / fused:.2f}" if ref and fused else "-"
            vs_comp = f"{comp / fused:.2f}" if comp and fused else "-"
            launches = impls.get("fused", {}).get("launches", {}).get("total", "-")
            replay = graphs.get((op, "fused"), {}).get("replay_ms")
            peak = impls.get("fused", {}).get("peak_extra_mb")
            lines.append(f"  {op:13s} {_ms(ref):>10s} {_ms(comp):>10s} {_ms(fused):>10s} {vs_eager:>8s} {vs_comp:>10s}"
                         f" {launches!s:>8s} {_ms(replay):>8s} {_ms(peak):>8s}")
    for r in records:
        if r.get("step") == "ceilings" and r.get("status") == "ok" and r.get("sub") != "step":
            lines.append(f"ceiling {r.get('sub')}: {r.get('value')} {r.get('unit')} ({r.get('what')})")
        if r.get("step", "").startswith("train_") and r.get("sub") not in (None, "step"):
            bits = [f"{r['step']} {r['sub']}: {r.get('status')}"]
            for key in ("seconds", "first_step_s", "second_step_s", "median_ms", "speedup_vs_reference", "mfu_bf16",
                        "second_step_compiled", "error"):
                if key in r:
                    bits.append(f"{key} {r[key]}")
            if "dynamo_first_step" in r:
                d = r["dynamo_first_step"]
                bits.append(f"first step: {d.get('graphs')} graphs, {d.get('recompiles')} recompiles")
            lines.append("  ".join(str(b) for b in bits))
        if r.get("step") == "tests" and r.get("sub") == "pytest":
            lines.append(f"tests: {r.get('passed')} passed, {r.get('failed')} failed, {r.get('skipped')} skipped"
                         + (f"; failing: {r.get('failing')}" if r.get("failing") else ""))
    failures = [f"{r.get('step')}/{r.get('sub')}: {r.get('error') or r.get('reason') or r.get('status')}"
                for r in records if r.get("status") in ("failed", "timeout", "killed")]
    lines += ["", "failures:" if failures else "no failures"] + [f"  {f}" for f in failures]
    return "\n".join(lines) + "\n"


# ============================================================================ the steps (child processes)

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


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _dry_run_compile():
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


def step_env(ctx):
    import importlib
    import platform

    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "root": str(ROOT),
            "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_HOME", "CUDA_VISIBLE_DEVICES",
                                                    "TORCH_CUDA_ARCH_LIST", "PYTHONPATH", "CONFETI_KERNELS")}}
    for name in ("triton", "numpy", "pytest", "pytest_benchmark", "PIL", "cv2", "tqdm", "setuptools", "ninja"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as exc:
            info[name] = f"MISSING ({type(exc).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    device_count=torch.cuda.device_count())
        try:
            version = torch._C._cuda_getDriverVersion()
            info["driver_cuda_version"] = f"{version // 1000}.{version % 1000 // 10}"
        except Exception:
            pass
    else:
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    for key, command in (("driver", ["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm,power.limit",
                                     "--format=csv,noheader"]),
                         ("nvcc", ["nvcc", "--version"]), ("commit", ["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
                         ("git_status", ["git", "-C", str(ROOT), "status", "--porcelain"])):
        if key in ("commit", "git_status") and not (ROOT / ".git").exists():
            info[key] = None  # a copy of the tree without .git (git would find an enclosing repository)
            continue
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=20)
            text = done.stdout.rstrip() if done.returncode == 0 else None
            info[key] = (text.splitlines()[-1] if key == "nvcc" and text else
                         (text.splitlines()[:20] if key == "git_status" and text is not None else text))
        except Exception:
            info[key] = None
    info["tree_digest"] = tree_digest()
    try:
        from confeti_fast.kernels import contrast, patch_nce, proto_update

        info["fused"] = {"triton": contrast.AVAILABLE and patch_nce.AVAILABLE,
                         "triton_error": contrast.LOAD_ERROR or patch_nce.LOAD_ERROR,
                         "ext_cpu": proto_update.AVAILABLE, "ext_cpu_error": proto_update.LOAD_ERROR,
                         "ext_cuda": proto_update.CUDA_AVAILABLE, "ext_cuda_error": proto_update.CUDA_LOAD_ERROR}
    except Exception as exc:
        info["fused"] = {"error": last_line(exc)}
    write_atomic(ctx.out / "env.json", (json.dumps(info, indent=1, default=str) + "\n").encode())
    short = {k: info.get(k) for k in ("device_name", "capability", "memory_gib", "torch", "triton", "cuda", "cudnn",
                                      "driver", "numpy", "pytest", "commit", "tree_digest", "fused", "cv2", "tqdm")}
    ctx.rec.write(sub="env", status="ok", **short)


def _extension_state(need_cuda):
    code = ("import json, sys\nfrom confeti_fast.kernels import proto_update as p\n"
            "files = {n: getattr(sys.modules.get('confeti_fast.' + n), '__file__', None) for n in ('_C', '_C_cuda')}\n"
            "print(json.dumps({'cpu': p.AVAILABLE, 'cuda': p.CUDA_AVAILABLE, 'cpu_error': p.LOAD_ERROR, "
            "'cuda_error': p.CUDA_LOAD_ERROR, 'files': files}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    try:
        state = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        state = {"cpu": False, "cuda": False, "cpu_error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    # built in this tree (not an installed copy elsewhere that happens to import)
    files = state.get("files") or {}
    here = all(str(files[n]).startswith(str(ROOT)) for n in (("_C", "_C_cuda") if need_cuda else ("_C",))
               if files.get(n))
    state["ready"] = bool(state["cpu"] and (state["cuda"] or not need_cuda) and here)
    return state


def step_extension(ctx):
    need_cuda = not ctx.dry
    before = _extension_state(need_cuda)
    if before["ready"]:
        ctx.rec.write(sub="extension", status="ok", built=False, state=before, note="imports in place: not rebuilt")
        return
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    if need_cuda:
        env.update(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    else:
        env.pop("FORCE_CUDA", None)
    log = ctx.logs / "build_ext.log"
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], stdout=f,
                                stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, timeout=max(10, ctx.remaining() - 10)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    after = _extension_state(need_cuda)
    ctx.rec.write(sub="extension", status="ok" if after["ready"] else "failed", built=True, rc=rc,
                  seconds=round(time.time() - t0, 1), cuda_build=need_cuda, state=after,
                  log_tail=log.read_text(errors="replace").splitlines()[-5:])


def step_tests(ctx):
    import xml.etree.ElementTree as ET

    junit = ctx.logs / "tests.xml"
    command = [sys.executable, "-m", "pytest", *TEST_FILES, "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
    t0 = time.time()
    try:
        rc = subprocess.run(command, cwd=ROOT, timeout=max(10, ctx.remaining() - 5)).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    try:
        for case in ET.parse(junit).getroot().iter("testcase"):
            counts["tests"] += 1
            for kind, key in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
                node = case.find(kind)
                if node is not None:
                    counts[key] += 1
                    if kind != "skipped":
                        message = (node.get("message") or "").splitlines()
                        reason = message[0][:200] if message else ""
                        failing.append(f"{case.get('classname')}::{case.get('name')}: {reason}")
    except (OSError, ET.ParseError) as exc:
        failing.append(f"no junit XML: {last_line(exc)}")
    passed = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    ctx.rec.write(sub="pytest", status="ok" if rc == 0 else ("timeout" if rc == 124 else "failed"), rc=rc,
                  seconds=round(time.time() - t0, 1), passed=passed, failed=counts["failed"] + counts["errors"],
                  skipped=counts["skipped"], failing=failing[:50], files=list(TEST_FILES),
                  device="cpu (TRITON_INTERPRET=1; the bf16 / CUDA variants skip)" if ctx.dry else "cuda")


def _op_setting(ctx):
    """(make_case keywords, note): on the GPU the paper's shapes in bf16 + channels_last under
    bf16 autocast, as a training step runs the ops."""
    import torch

    setting = dict(dtype=torch.bfloat16, channels_last=True, autocast=True)
    if ctx.dry:
        return dict(setting, size="tiny"), "tiny shapes on the CPU (Triton under TRITON_INTERPRET=1)"
    return dict(setting, size="paper"), None


def _fused(ctx, op):
    """(fn, note): the fused implementation the GPU runs; in a dry run the CUDA dispatch's
    implementation called on CPU tensors (Triton under the interpreter)."""
    import cases
    from confeti_fast import ops
    from confeti_fast.ops import reference

    if not ctx.dry:
        return cases.implementation(op, ctx.device, "fused"), None
    name = cases.FUNCTION[op]
    fn, missing = ops._fused(name, "cuda")
    if fn is not None and fn is not getattr(reference, name):
        return fn, "the CUDA dispatch's fused op on CPU tensors (Triton under TRITON_INTERPRET=1)"
    return cases.implementation(op, "cpu", "fused"), f"the CPU fused op (no CUDA fused op here: {missing})"


def _time_case(ctx, case, fn):
    import cases
    from confeti_fast.profiling import count_launches

    timed, warmup = ROUNDS[ctx.dry]
    t0 = time.perf_counter()
    case.call(fn, *case.setup())  # compilation, Triton JIT, lazy init
    _sync(ctx.device)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        case.call(fn, *case.setup())
    _sync(ctx.device)
    times = []
    for _ in range(timed):
        args = case.setup()
        _sync(ctx.device)
        t0 = time.perf_counter()
        case.call(fn, *args)
        _sync(ctx.device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = cases.peak_extra_mb(case, fn)
    args = case.setup()
    _sync(ctx.device)
    launches = count_launches(lambda: case.call(fn, *args))
    _sync(ctx.device)
    return {"median_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4), "rounds": timed,
            "first_call_ms": round(first_ms, 1), "peak_extra_mb": round(peak, 3),
            "launches": {"total": launches.total, "triton": launches.triton, "torch_ops": launches.torch_ops,
                         "names": launches.names[:60]}}


def step_ops(ctx, compiled=False):
    import cases

    setting, note = _op_setting(ctx)
    medians = {}
    for r in read_records(ctx.out, ctx.rec.common["run"]):
        if r.get("step") == "ops" and r.get("status") == "ok" and r.get("impl"):
            medians[(r["op"], r["impl"])] = r["median_ms"]
    for op in cases.OPS:
        impls = ("compiled",) if compiled else ("reference", "fused")
        for impl in impls:
            case = cases.make_case(op, ctx.device, **setting)
            fields = dict(case.info(), impl=impl)
            if note:
                fields["substituted"] = note
            if compiled and op in cases.COMPILE_SKIPPED:
                ctx.rec.write(sub=f"{op}/{impl}", status="skipped", reason=cases.COMPILE_SKIPPED[op], **fields)
                continue

            def measure(op=op, impl=impl, case=case):
                if impl == "fused":
                    fn, why = _fused(ctx, op)
                else:
                    fn, why = cases.implementation(op, ctx.device, impl), None
                result = _time_case(ctx, case, fn)
                if why:
                    result["implementation"] = why
                if ctx.dry and impl == "compiled":
                    result["substituted"] = (note + "; " if note else "") + "torch.compile backend aot_eager"
                medians[(op, impl)] = result["median_ms"]
                ref, fused = medians.get((op, "reference")), medians.get((op, "fused"))
                if impl != "reference" and ref:
                    result["speedup_vs_reference"] = round(ref / result["median_ms"], 2)
                if impl == "compiled" and fused:
                    result["fused_speedup_vs_compiled"] = round(result["median_ms"] / fused, 2)
                return result

            ctx.sub(f"{op}/{impl}", 30 if compiled else 10, measure, **fields)


def step_graphs(ctx):
    import torch

    import cases

    setting, note = _op_setting(ctx)
    timed = ROUNDS[ctx.dry][0]
    # The fused ops first; the references last: the contrast reference reads `kept.any()` back
    # to the host, which a capture forbids (recorded as unsupported), and a failed capture must
    # not disturb the others.
    plan = [("contrast", "fused"), ("patch_nce", "fused"), ("proto_update", "fused"), ("patch_nce", "reference"),
            ("contrast", "reference")]
    for op, impl in plan:
        case = cases.make_case(op, ctx.device, **setting)
        fields = dict(case.info(), impl=impl)

        def measure(op=op, impl=impl, case=case):
            fn = _fused(ctx, op)[0] if impl == "fused" else cases.implementation(op, ctx.device, impl)
            args = case.setup()
            for _ in range(3):
                case.call(fn, *args)
            _sync(ctx.device)
            wall = []
            for _ in range(timed):
                t0 = time.perf_counter()
                case.call(fn, *args)
                _sync(ctx.device)
                wall.append((time.perf_counter() - t0) * 1e3)
            result = {"wall_ms": round(statistics.median(wall), 4), "rounds": timed}
            if ctx.dry:
                replay = wall  # no CUDA graphs on the CPU: the eager call stands in for the replay
                result["substituted"] = ((note + "; " if note else "")
                                         + "no CUDA graph: the eager call timed as the replay")
            else:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        case.call(fn, *args)
                torch.cuda.current_stream().wait_stream(stream)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        case.call(fn, *args)
                    torch.cuda.synchronize()
                except Exception as exc:
                    if impl == "fused":
                        raise
                    return dict(result, status="unsupported", error=last_line(exc),
                                reason="the reference does not capture (a host sync or a data-dependent shape)")
                graph.replay()
                torch.cuda.synchronize()
                replay = []
                for _ in range(timed):
                    t0 = time.perf_counter()
                    graph.replay()
                    torch.cuda.synchronize()
                    replay.append((time.perf_counter() - t0) * 1e3)
                del graph
            result["replay_ms"] = round(statistics.median(replay), 4)
            result["host_ms"] = round(result["wall_ms"] - result["replay_ms"], 4)
            return result

        ctx.sub(f"{op}/{impl}", 5, measure, **fields)
    ctx.rec.write(sub="proto_update/reference", status="skipped", op="proto_update", impl="reference",
                  reason="the reference reads data-dependent sizes back to the host (nonzero, per-class top-k): "
                         "not capturable in a CUDA graph")


def step_ceilings(ctx):
    import torch

    device = ctx.device
    if ctx.dry:
        nbytes, n, dtype = 64 * 2**20, 512, torch.float32
    else:
        nbytes, n, dtype = 2**30, 8192, torch.bfloat16
    reps = 5 if ctx.dry else 20

    def timed(fn):
        fn()
        _sync(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    def copy():
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        seconds = timed(lambda: dst.copy_(src))
        return {"value": round(2 * nbytes / seconds / 1e9, 1), "unit": "GB/s",
                "what": f"{nbytes / 2**20:.0f} MiB copy_, read + write bytes, {reps} reps"}

    def matmul():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = timed(lambda: torch.mm(a, b))
        return {"value": round(2 * n**3 / seconds / 1e12, 2), "unit": "TFLOP/s",
                "what": f"{n}^3 {str(dtype).replace('torch.', '')} matmul, {reps} reps"}

    note = {"substituted": "CPU: 64 MiB copy and a 512^3 fp32 matmul"} if ctx.dry else {}
    ctx.sub("copy_bandwidth", 5, copy, **note)
    ctx.sub("matmul_bf16", 5, matmul, **note)


def dynamo_snapshot():
    import torch

    from torch._dynamo.utils import counters

    snap = {"frames": counters["frames"]["ok"], "frames_total": counters["frames"]["total"],
            "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    try:
        metrics = torch._dynamo.utils.get_compilation_metrics()
    except Exception:
        metrics = None
    if metrics is not None:
        frames = [m for m in metrics if getattr(m, "co_name", None)]  # entries without a frame: backward graphs
        has_reason = bool(frames) and hasattr(frames[0], "recompile_reason")
        reasons = []
        for m in frames:
            compile_id = str(getattr(m, "compile_id", "") or "")
            if has_reason:
                again = bool(m.recompile_reason)
            else:
                try:
                    again = int(compile_id.strip("[]!").split("/")[1].split("_")[0]) > 0
                except (IndexError, ValueError):
                    again = False
            if again:
                reason = " ".join(str(getattr(m, "recompile_reason", None) or "(no reason recorded)").split())
                reasons.append(f"{m.co_name} {compile_id}: {reason}"[:300])
        snap["compiles"] = len(frames)
        snap["recompiles"] = len(reasons)
        snap["_reasons"] = reasons
    snap["_breaks"] = dict(list(counters["graph_break"].items())[:10])
    return snap


def dynamo_delta(before, after):
    delta = {k: after[k] - before.get(k, 0) for k in after if not k.startswith("_") and isinstance(after[k], int)}
    if "_reasons" in after:
        delta["recompile_reasons"] = after["_reasons"][len(before.get("_reasons", [])):][:10]
    if after.get("_breaks"):
        delta["graph_break_reasons"] = {k[:200]: v for k, v in after["_breaks"].items()}
    return delta


def step_train(ctx, stage):
    """The training step of `stage`: its data and work dirs live in a temporary folder, removed after."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_suite_stage{stage}.") as data:
        _step_train(ctx, stage, Path(data))


def _step_train(ctx, stage, data):
    import gc

    import torch

    import train_cases as tc
    from confeti_fast import ops

    try:
        torch._dynamo.utils.set_compilation_metrics_limit(100_000)
    except Exception:
        pass
    device = ctx.device
    size = "tiny" if ctx.dry else "paper"
    # dry run: the CUDA defaults but CUDA graphs (compile "default"; aot_eager, see _dry_run_compile)
    runtime = ({"amp": "bf16", "channels_last": True, "compile": "default", "fused_optimizer": True,
                "check_finite": "log"} if ctx.dry else None)
    cfg = tc.config(size, data / "data")
    batch = tc.synthetic_batch(cfg, stage, torch.Generator().manual_seed(0))
    crop = cfg["stages"][str(stage)]["crop_size"]
    common = {"stage": stage, "size": size, "crop": crop, "depth": cfg["model"]["depth"],
              "cut_channels": cfg["cut"]["ngf"]}
    if ctx.dry:
        common["substituted"] = ("CPU, tiny config, the CUDA runtime defaults but compile 'default' (no CUDA "
                                 "graphs) with the aot_eager backend")
    state = {}

    def step():
        losses = state["trainer"].step(batch, tc.STEP_T)
        _sync(device)
        return losses

    def compile_check():
        t0 = time.time()
        with ops.kernels("fused"):
            trainer = state["trainer"] = tc.make_trainer(cfg, stage, data / "fast", device, "fast", runtime)
        result = {"runtime": trainer.runtime, "build_s": round(time.time() - t0, 1),
                  "fused": {n: getattr(ops.implementation(n, device), "__module__", "?") for n in ops.OP_NAMES}}
        s0 = dynamo_snapshot()
        t0 = time.time()
        losses = step()
        result["first_step_s"] = round(time.time() - t0, 1)
        s1 = dynamo_snapshot()
        result["dynamo_first_step"] = dynamo_delta(s0, s1)
        result["losses"] = {k: round(float(v), 5) for k, v in losses.items()}
        result["losses_finite"] = all(torch.isfinite(torch.as_tensor(v)).item() for v in result["losses"].values())
        t0 = time.time()
        evaluation = trainer.evaluate()
        _sync(device)
        result["eval_s"] = round(time.time() - t0, 1)
        result["eval"] = ({k: evaluation[k] for k in ("mIoU", "num_images", "mode") if k in evaluation}
                          or "none (stage 0)")
        s2 = dynamo_snapshot()
        result["dynamo_eval"] = dynamo_delta(s1, s2)
        t0 = time.time()
        step()
        result["second_step_s"] = round(time.time() - t0, 1)
        s3 = dynamo_snapshot()
        result["dynamo_second_step"] = dynamo_delta(s2, s3)
        result["second_step_compiled"] = bool(result["dynamo_second_step"].get("frames") or
                                              result["dynamo_second_step"].get("graphs"))
        result["dynamo_total"] = dynamo_delta({}, s3)
        if device == "cuda":
            result["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return result

    ctx.sub("compile", 0, compile_check, **common)
    if "trainer" not in state:
        return

    def sync_check():
        step()  # one more plain step first (CUDA-graph trees record on their second run)
        if ctx.dry:
            step()
            return {"substituted": "no CUDA: the step ran without torch.cuda.set_sync_debug_mode('error')"}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            state["trainer"].step(batch, tc.STEP_T)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return {"sync_debug_mode": "error", "host_syncs": 0}

    ctx.sub("sync", budget("sync", ctx.dry), sync_check, **common)
    if stage == 0:
        return
    timed, warmup = TRAIN_ROUNDS[ctx.dry]
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"

    def time_steps(trainer):
        for _ in range(warmup):
            trainer.step(batch, tc.STEP_T)
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(timed):
            t0 = time.perf_counter()
            trainer.step(batch, tc.STEP_T)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        result = {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2), "rounds": timed,
                  "device_name": device_name, "runtime": trainer.runtime}
        if device == "cuda":
            result["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return result

    def bench_fast():
        with ops.kernels("fused"):
            result = time_steps(state["trainer"])
        state["fast"] = result
        return dict(result, variant="fast", kernels="fused")

    ctx.sub("bench_fast", budget("bench_fast", ctx.dry), bench_fast, **common)
    state.pop("trainer", None)
    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()

    def bench_reference():
        with ops.kernels("reference"):
            trainer = tc.make_trainer(cfg, stage, data / "reference", device, "reference")
            trainer.step(batch, tc.STEP_T)
            result = time_steps(trainer)
            result["step_tflop"] = round(tc.step_flops(trainer, batch) / 1e12, 4)
        if "fast" in state:
            result.update(tc.speedup_info(state["fast"]["median_ms"], state["fast"], result["median_ms"], result))
            result["fast_median_ms"] = state["fast"]["median_ms"]
        return dict(result, variant="reference", kernels="reference")

    ctx.sub("bench_reference", budget("bench_reference", ctx.dry), bench_reference, **common)


STEPS = {
    "env": step_env, "extension": step_extension, "tests": step_tests, "ops": step_ops,
    "graphs": step_graphs, "ceilings": step_ceilings, "ops_compiled": lambda ctx: step_ops(ctx, compiled=True),
    "train_stage0": lambda ctx: step_train(ctx, 0), "train_stage1": lambda ctx: step_train(ctx, 1),
    "train_stage2": lambda ctx: step_train(ctx, 2),
}


def run_step(args):
    sys.path[:0] = [p for p in (str(ROOT), str(HERE)) if p not in sys.path]
    ctx = Context(args)

    def terminated(signum, frame):  # the deadline's backstop, or the driver stopped: say where, then go
        ctx.rec.write(sub=ctx.current or "body", status="killed", reason=f"stopped by signal {signum}")
        os._exit(124)

    signal.signal(signal.SIGTERM, terminated)
    if ctx.dry and args.step not in ("env", "extension", "tests"):
        _dry_run_compile()
    try:
        STEPS[args.step](ctx)
    except Exception as exc:
        traceback.print_exc()
        ctx.rec.write(sub=ctx.current or "body", status="failed", error=last_line(exc), where=where(exc))
    sys.stdout.flush()
    os._exit(1 if ctx.rec.failed else 0)  # skip interpreter teardown (CUDA, compile workers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a part (or both) of the suite")
    run.add_argument("--suite", choices=("kernels", "train", "all"), default="kernels")
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
