"""The GPU suite's driver (benchmarks/gpu_suite.py and benchmarks/suite/) on the CPU: the
deadline skips and records what does not fit, every record is a JSON line written as it comes,
at most 6 files land in $OUT, and a driver stopped mid-way leaves valid results. (The whole dry
run, `GPU_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh`, runs in .ci/run.)"""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(REPO / "benchmarks"))
from suite.budgets import PARTS  # noqa: E402
from suite.records import MAX_OUT_FILES  # noqa: E402
from suite.setup_steps import tree_digest  # noqa: E402


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _driver(out, *args):
    return [sys.executable, str(DRIVER), "run", "--out", str(out), "--dry-run", *args]


def test_steps_that_do_not_fit_are_skipped_and_recorded(tmp_path):
    done = subprocess.run(_driver(tmp_path, "--suite", "all", "--deadline", "20"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr  # a dry run must run every step
    steps = {(r["part"], r["step"]): r for r in _records(tmp_path) if r["sub"] == "step"}
    assert set(steps) == {(part, name) for part, names in PARTS.items() for name in names}
    assert all(steps[key]["status"] == "skipped" for key in steps)  # 20 s less the reserve fits none
    assert _files(tmp_path) == ["logs.tar.gz", "results.jsonl", "summary.txt"]
    assert "skipped" in (tmp_path / "summary.txt").read_text()


def test_a_short_dry_run_writes_records_summary_and_archive(tmp_path):
    done = subprocess.run(_driver(tmp_path, "--suite", "kernels", "--steps", "env,ceilings"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    records = _records(tmp_path)
    assert {r["step"] for r in records if r["sub"] == "step" and r["status"] == "ok"} == {"env", "ceilings"}
    assert all(r["dry_run"] is True and r["run"] == records[0]["run"] for r in records)
    ceilings = {r["sub"]: r for r in records if r["step"] == "ceilings" and r["sub"] != "step"}
    assert ceilings["copy_bandwidth"]["unit"] == "GB/s" and ceilings["copy_bandwidth"]["value"] > 0
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch"] and env["tree_digest"] == tree_digest()
    assert len(_files(tmp_path)) <= MAX_OUT_FILES
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert "logs/kernels.ceilings.log" in tar.getnames()


def test_a_driver_stopped_mid_way_leaves_valid_results(tmp_path):
    process = subprocess.Popen(_driver(tmp_path, "--suite", "kernels", "--steps", "env,tests"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until env is recorded and the tests have started
            path = tmp_path / "results.jsonl"
            if path.exists() and any(r["step"] == "env" and r["sub"] == "step" for r in _records(tmp_path)):
                break
            time.sleep(0.5)
        time.sleep(2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    records = _records(tmp_path)  # every line parses
    status = {r["step"]: r["status"] for r in records if r["sub"] == "step"}
    assert status == {"env": "ok", "tests": "killed"}
    assert len(_files(tmp_path)) <= MAX_OUT_FILES
    assert "killed" in (tmp_path / "summary.txt").read_text()
