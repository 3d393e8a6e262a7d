"""train.py as a user runs it: outputs, --resume auto, and one-line errors."""
import subprocess
import sys
from pathlib import Path

from confeti_fast.config import dump_config
from helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _train(*args):
    return subprocess.run([sys.executable, "train.py", *map(str, args), "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_train_then_resume_auto_continues(tmp_path):
    cfg_path = dump_config(tiny_config(tmp_path), tmp_path / "tiny.py")
    work = tmp_path / "work"
    first = _train("--config", cfg_path, "--work-dir", work, "--iters", 2, "--kernels", "reference")
    assert first.returncode == 0, first.stderr
    assert "target mIoU" in first.stdout and (work / "stage2" / "last.pth").is_file()
    again = _train("--config", cfg_path, "--work-dir", work, "--iters", 4, "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert "resume: from" in again.stdout and "after 4 iterations" in again.stdout


def test_cli_errors_are_one_line(tmp_path):
    unknown = _train("--config", "gta2city")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().startswith("error: unknown preset 'gta2city'")
    assert len(unknown.stderr.strip().splitlines()) == 1
    cfg_path = dump_config(tiny_config(tmp_path), tmp_path / "tiny.py")
    missing = _train("--config", cfg_path, "--resume", tmp_path / "nope.pth", "--work-dir", tmp_path / "w")
    assert missing.returncode == 2 and f"checkpoint {tmp_path / 'nope.pth'} does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
