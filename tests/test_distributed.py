"""Multi-process training with torchrun on the CPU (gloo): identical ranks, resume under another
world size, and the rank check itself."""
import pytest

from confeti_fast.config import dump_config
from helpers import assert_rank0_wrote_four_steps, logged_iters, run_ranks, stage1_command, tiny_config


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    cfg = tiny_config(tmp_path, cut=True)
    dump_config(cfg, tmp_path / "cfg.py")
    train = stage1_command(tmp_path / "cfg.py")
    done = run_ranks(train + ["--work-dir", str(tmp_path / "two")], 2, tmp_path)
    return tmp_path, train, done


def test_two_ranks_stay_identical_and_rank0_writes(two_rank_run):
    # CONFETI_CHECK_RANKS=1: every step compares student, teacher, prototypes and CUT across
    # ranks and fails the run on any difference; rc 0 means they matched after every step.
    tmp_path, _, done = two_rank_run
    assert_rank0_wrote_four_steps(tmp_path / "two" / "stage1")
    assert "stage 1: target mIoU" in done.stdout


@pytest.mark.parametrize("procs", [1, 2])
def test_checkpoint_resumes_under_another_world_size(two_rank_run, procs):
    tmp_path, train, _ = two_rank_run
    work = tmp_path / f"resumed{procs}"
    run_ranks(train + ["--work-dir", str(work), "--resume", str(tmp_path / "two" / "stage1" / "last.pth"),
                       "--iters", "6"], procs, tmp_path)
    assert logged_iters(work / "stage1" / "log.jsonl") == [5, 6]


def test_rank_check_catches_a_difference(tmp_path):
    script = tmp_path / "differ.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from confeti_fast import distributed\n"
        "from confeti_fast.errors import ConfetiError\n"
        "ctx = distributed.from_environment('cpu')\n"
        "same = torch.arange(4.0)\n"
        "ctx.assert_identical({'same': [same]}, 0)\n"
        "differs = torch.arange(4.0) + (1e-7 if ctx.rank else 0.0)\n"
        "try:\n"
        "    ctx.assert_identical({'same': [same], 'differs': [differs]}, 7)\n"
        "except ConfetiError as err:\n"
        "    open(f'caught{ctx.rank}.txt', 'w').write(str(err))\n"
        "distributed.shutdown()\n")
    run_ranks([str(script)], 2, tmp_path)  # one file per rank: their stdout lines can interleave
    for rank in (0, 1):
        assert (tmp_path / f"caught{rank}.txt").read_text() == "iteration 7: ranks hold different differs"
