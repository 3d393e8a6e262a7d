"""The driver's side: each step of each part in its own process, under the part's one deadline."""
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from . import DRIVER, ROOT
from .budgets import KILL_GRACE_S, PARTS, RESERVE_S, budget
from .records import MAX_OUT_FILES, OUT_FILES, Recorder, last_line, read_records, write_atomic
from .summary import summary_text


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
        command = [sys.executable, str(DRIVER), "step", step, "--out", str(self.out),
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

