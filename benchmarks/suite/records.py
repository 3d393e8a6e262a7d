"""What a run leaves under $OUT: results.jsonl, one JSON object per case, written as it comes."""
import json
import os
import time
import traceback
from pathlib import Path

from . import ROOT

MAX_OUT_FILES = 6
OUT_FILES = ("results.jsonl", "env.json", "summary.txt", "logs.tar.gz")


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


def write_atomic(path, data):
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)
