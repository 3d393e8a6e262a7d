"""What clusters do to a long run: preemption signals, write failures (a full disk, a denied
write), a device that is not there. Each ends in a saved state or one line naming the path or
option, with the previous checkpoint intact and no temporary file left."""
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from confeti_fast import errors, runtime, serialization
from confeti_fast.config import dump_config, merge
from confeti_fast.errors import ConfetiError, writing
from confeti_fast.preemption import SignalFlag, resume_command
from confeti_fast.serialization import load_training_checkpoint, save_atomic
from confeti_fast.trainer import Trainer
from confeti_fast.training_log import read_log
from helpers import REPO, assert_states_equal, tiny_config

ITERS = 8


def _train_command(cfg_path, work_dir, *extra):
    return [sys.executable, str(REPO / "train.py"), "--config", str(cfg_path), "--stage", "2", "--device", "cpu",
            "--no-progress", "--work-dir", str(work_dir), *extra]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _loss_records(log):
    return [r for r in read_log(log, partial=True) if "loss/src_ce" in r]


def _tmp_files(folder):
    return sorted(p.name for p in Path(folder).rglob("*.tmp"))


def test_sigterm_mid_run_then_resume_auto_ends_bitwise_as_an_uninterrupted_run(tmp_path):
    cfg = merge(tiny_config(tmp_path), {"stages": {"2": {"iters": ITERS}}, "evaluation": {"interval": 4}})
    cfg_path = dump_config(cfg, tmp_path / "cfg.py")
    straight = subprocess.run(_train_command(cfg_path, tmp_path / "straight"), env=_env(), capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    stop_after = random.Random().randint(1, ITERS - 2)  # any iteration but the last ones
    out = tmp_path / "stopped" / "stage2"
    proc = subprocess.Popen(_train_command(cfg_path, tmp_path / "stopped"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(_loss_records(out / "log.jsonl")) < stop_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped_at = load_training_checkpoint(out / "last.pth")["iteration"]
    assert stop_after <= stopped_at < ITERS, (stop_after, stopped_at)
    last_line = err.strip().splitlines()[-1]
    assert f"stopped by SIGTERM after {stopped_at} iterations of stage 2" in last_line and "--resume auto" in last_line
    assert _tmp_files(tmp_path / "stopped") == []

    resumed = subprocess.run(_train_command(cfg_path, tmp_path / "stopped", "--resume", "auto"), env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: from {out / 'last.pth'}" in resumed.stdout
    a = load_training_checkpoint(tmp_path / "straight" / "stage2" / "last.pth")
    b = load_training_checkpoint(out / "last.pth")
    assert a["iteration"] == b["iteration"] == ITERS
    for key in ("model", "student", "teacher", "reg_proj", "prototypes", "proto_counts", "optimizer"):
        assert_states_equal(a[key], b[key], key)


def test_a_second_signal_while_saving_is_noted_and_the_checkpoint_completes(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save_signalled_twice(obj, f):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only notes it: the write goes on
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_signalled_twice)
    with SignalFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        save_atomic({"w": torch.arange(10)}, tmp_path / "last.pth")
    assert flag.received == signal.SIGTERM
    assert torch.equal(serialization.read_checkpoint(tmp_path / "last.pth")["w"], torch.arange(10))
    assert "received again: already stopping" in capsys.readouterr().err
    assert _tmp_files(tmp_path) == []


def test_resume_command_replaces_any_resume_option():
    assert resume_command(["train.py", "--stage", "2"]) == "python train.py --stage 2 --resume auto"
    assert resume_command(["train.py", "--resume", "x/last.pth", "--stage", "1"]) == \
        "python train.py --stage 1 --resume auto"
    assert resume_command(["train.py", "--work-dir", "my runs/a"]) == \
        "python train.py --work-dir 'my runs/a' --resume auto"


@pytest.mark.parametrize("failure, reason", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054"),
     "No space left on device"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "Read-only file system"),
])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, failure, reason):
    last = tmp_path / "last.pth"
    save_atomic({"iteration": 2}, last)
    before = last.read_bytes()

    def save_dies_halfway(obj, f):
        f.write(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", save_dies_halfway)
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 0})())
    with pytest.raises(ConfetiError) as err:
        save_atomic({"iteration": 4}, last)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot write {last}: {reason}")
    assert "previous last.pth is intact" in message
    assert last.read_bytes() == before and _tmp_files(tmp_path) == []


def test_a_disk_full_in_a_run_stops_with_one_line_and_a_loadable_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    run = Trainer(cfg, 2, tmp_path / "run", progress=False)
    real_save = torch.save
    calls = {"n": 0}

    def disk_fills_at_the_second_checkpoint(obj, f):
        calls["n"] += 1
        if calls["n"] >= 3:  # interval 2: last.pth and best.pth at t = 2, then last.pth at t = 4 fails
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 96")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", disk_fills_at_the_second_checkpoint)
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1024})())
    with pytest.raises(ConfetiError, match="No space left on device; the previous last.pth is intact"):
        run.train()
    last = tmp_path / "run" / "stage2" / "last.pth"
    assert load_training_checkpoint(last)["iteration"] == 2
    assert _tmp_files(tmp_path / "run") == []


def test_log_panel_curve_prediction_and_config_writes_that_fail_name_the_file(tmp_path):
    from confeti_fast.visualize import plot_curves, save_panel

    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where a folder should be")  # fails for root too, unlike chmod
    with pytest.raises(ConfetiError, match=rf"cannot write {blocked / 'panel.png'}: (File exists|Not a directory)$"):
        save_panel([("x", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy())], blocked / "panel.png")
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 1, "loss/src_ce": 1.0}\n')
    with pytest.raises(ConfetiError, match=rf"cannot write {blocked / 'curves.png'}: (File exists|Not a directory)$"):
        plot_curves(log, blocked / "curves.png")
    from confeti_fast.evaluation import write_png

    with pytest.raises(ConfetiError, match=rf"cannot write {blocked / 'a.png'}: (File exists|Not a directory)$"):
        write_png(torch.zeros(4, 4, dtype=torch.uint8).numpy(), blocked / "a.png")  # a prediction
    with pytest.raises(ConfetiError, match=rf"cannot write {blocked / 'config.py'}: (File exists|Not a directory)$"):
        dump_config({"name": "x"}, blocked / "config.py")
    with pytest.raises(ConfetiError, match=rf"cannot write {blocked / 'log.jsonl'}: Not a directory"):
        with writing(blocked / "log.jsonl"), open(blocked / "log.jsonl", "a") as f:
            f.write("{}\n")


def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU: the case needs one without")
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfetiError, match=r"^--device cuda: .*; pass --device cpu") as err:
        Trainer(cfg, 2, tmp_path / "run", device="cuda", progress=False)
    assert "\n" not in str(err.value)
    cfg_path = dump_config(cfg, tmp_path / "cfg.py")
    command = [sys.executable, str(REPO / "train.py"), "--config", str(cfg_path), "--stage", "2", "--device", "cuda",
               "--work-dir", str(tmp_path / "w"), "--no-progress"]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --device cuda:"), done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1


def test_bf16_on_a_gpu_without_bf16_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(ConfetiError, match=r"runtime.amp bf16: Tesla V100-SXM2-32GB has no bf16 support; "
                                           r"pass --amp fp32"):
        runtime.check_precision({"amp": "bf16"}, torch.device("cuda"))
    runtime.check_precision({"amp": "fp32"}, torch.device("cuda"))  # fp32 asks nothing of the card


# ---------------------------------------------------------------- bad files, as a run meets them

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still decodes; the body is cut


def test_a_run_refuses_bad_pairs_at_start_up_then_skips_them_when_asked(tmp_path):
    from confeti_fast.data.check import DataCheckError

    cfg = tiny_config(tmp_path)
    images = sorted((tmp_path / "source" / "images").glob("*.png"))
    _truncate(images[1])  # a partial download
    label = tmp_path / "source" / "labels" / images[2].name
    from PIL import Image
    Image.open(label).resize((10, 10)).save(label)  # a label of another size than its image
    with pytest.raises(DataCheckError) as err:
        Trainer(cfg, 2, tmp_path / "run", progress=False)
    line = str(err.value).splitlines()[-1]
    assert "2 bad" in line and str(images[1]) in line and "data.bad_samples=skip" in line
    listed = (tmp_path / "run" / "stage2" / "bad_samples.txt").read_text()
    assert str(images[1]) in listed and str(label) in listed
    run = Trainer(merge(cfg, {"data": {"bad_samples": "skip"}}), 2, tmp_path / "run", progress=False)
    assert len(run.steps.source) == 2
    run.train()
    assert load_training_checkpoint(tmp_path / "run" / "stage2" / "last.pth")["iteration"] == 4


def test_a_file_that_turns_bad_mid_run_stops_after_a_save_or_is_replaced(tmp_path):
    from confeti_fast.data.check import BadSampleError

    cfg = tiny_config(tmp_path)
    images = sorted((tmp_path / "source" / "images").glob("*.png"))
    run = Trainer(cfg, 2, tmp_path / "error", progress=False)  # the start-up check passes
    for image in images[1:]:
        _truncate(image)  # e.g. a shared filesystem's copy error, hours in
    with pytest.raises(BadSampleError) as err:
        run.train()
    assert "\n" not in str(err.value) and any(str(image) in str(err.value) for image in images[1:])
    saved = load_training_checkpoint(tmp_path / "error" / "stage2" / "last.pth")["iteration"]
    assert saved == run.t < 4 and _tmp_files(tmp_path / "error") == []

    for image in images[1:]:
        image.write_bytes(images[0].read_bytes())  # whole again for the start-up check
    skipping = merge(cfg, {"data": {"bad_samples": "skip"}})
    runs = []
    for name in ("skip_a", "skip_b"):
        run = Trainer(skipping, 2, tmp_path / name, progress=False)
        for image in images[1:]:
            _truncate(image)
        run.train()
        for image in images[1:]:
            image.write_bytes(images[0].read_bytes())
        replaced = [r for r in read_log(tmp_path / name / "stage2" / "log.jsonl") if "replaced" in r]
        runs.append((replaced, run.state_dict()))
    assert runs[0][0] and runs[0][0] == runs[1][0]  # recorded, and the same stand-ins each time
    assert_states_equal(runs[0][1], runs[1][1])


def test_sigterm_under_torchrun_stops_every_rank_at_one_iteration_and_resumes_bitwise(tmp_path):
    """torchrun forwards the SIGTERM to its workers; they agree on the iteration, rank 0 saves and
    alone says so, and 2 processes resumed end where 2 processes run straight do."""
    from helpers import rank_check_env

    cfg = merge(tiny_config(tmp_path), {"stages": {"2": {"iters": ITERS}}, "evaluation": {"interval": 4}})
    cfg_path = dump_config(cfg, tmp_path / "cfg.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def command(work_dir, *extra):
        return launcher + _train_command(cfg_path, work_dir, *extra)[1:]

    out = tmp_path / "stopped" / "stage2"
    proc = subprocess.Popen(command(tmp_path / "stopped"), env=rank_check_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(_loss_records(out / "log.jsonl")) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the torchrun agent, as a scheduler does
    _, err = proc.communicate(timeout=300)
    stopped_at = load_training_checkpoint(out / "last.pth")["iteration"]
    stops = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stops) == 1 and f"after {stopped_at} iterations" in stops[0], err[-3000:]
    assert "the same torchrun command" in stops[0] and 2 <= stopped_at < ITERS
    for work_dir, extra in ((tmp_path / "stopped", ("--resume", "auto")), (tmp_path / "straight", ())):
        done = subprocess.run(command(work_dir, *extra), env=rank_check_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    a = load_training_checkpoint(tmp_path / "straight" / "stage2" / "last.pth")
    b = load_training_checkpoint(out / "last.pth")
    for key in ("model", "student", "teacher", "prototypes", "proto_counts", "optimizer"):
        assert_states_equal(a[key], b[key], key)
