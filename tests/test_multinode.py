"""Two torchrun agents on this machine as two nodes of one process each, joined by a c10d
rendezvous on 127.0.0.1: the ranks stay bit-identical (CONFETI_CHECK_RANKS=1 checks every step),
only rank 0 prints, and the checkpoint resumes under one process."""
import socket
import subprocess
import sys

import pytest

from confeti_fast.config import dump_config
from helpers import (assert_rank0_wrote_four_steps, logged_iters, rank_check_env, run_ranks, stage1_command,
                     tiny_config)

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(args, cwd):
    """Start node 0 and node 1 (one process each) as docs/multi-gpu.md shows; their outputs."""
    port = _free_port()
    nodes = []
    for node_rank in (0, 1):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "confeti-multinode-test",
                    "--local-addr", "127.0.0.1",
                    # node 0 hosts the rendezvous store; node 1 connects to it
                    "--rdzv-conf", f"is_host={'true' if node_rank == 0 else 'false'}"]
        nodes.append(subprocess.Popen(launcher + args, cwd=cwd, env=rank_check_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=600))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:] + err[-6000:]
    return outputs


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    import torch

    from confeti_fast.models import ResNetV1c
    from confeti_fast.trainer import Trainer

    tmp_path = tmp_path_factory.mktemp("multinode")
    cfg = tiny_config(tmp_path, cut=True)
    # an ImageNet file in the OpenMMLab layout, so that the load report is printed
    torch.save({"state_dict": ResNetV1c(18).state_dict()}, tmp_path / "r18_v1c.pth")
    cfg["model"]["pretrained"] = str(tmp_path / "r18_v1c.pth")
    dump_config(cfg, tmp_path / "cfg.py")
    Trainer(cfg, 1, tmp_path / "cut", device="cpu", progress=False).save({})  # G/D/F to start from
    train = stage1_command(tmp_path / "cfg.py")
    outputs = _two_nodes(train + ["--work-dir", str(tmp_path / "two"), "--resume", "auto",
                                  "--cut-checkpoint", str(tmp_path / "cut" / "stage1" / "last.pth")], tmp_path)
    return tmp_path, train, outputs


def test_two_nodes_stay_identical_and_rank0_writes(two_node_run):
    # rc 0 under CONFETI_CHECK_RANKS=1: student, teacher, prototypes and CUT matched bit for
    # bit across the two nodes after every step.
    tmp_path, _, _ = two_node_run
    assert_rank0_wrote_four_steps(tmp_path / "two" / "stage1")


def test_one_voice(two_node_run):
    """The lines of a run appear once, from rank 0, not once per rank (and so the two agents
    formed one world: two separate worlds would each have a rank 0 printing them)."""
    _, _, outputs = two_node_run
    lines = [line for out, _ in outputs for line in out.splitlines()]
    for start in ("resume: no checkpoint in", "ImageNet init from", "style transfer: G/D/F from",
                  "stage 1: target mIoU"):
        assert sum(line.startswith(start) for line in lines) == 1, (start, lines)


def test_two_node_checkpoint_resumes_under_one_process(two_node_run):
    tmp_path, train, _ = two_node_run
    work = tmp_path / "resumed"
    run_ranks(train + ["--work-dir", str(work), "--resume", str(tmp_path / "two" / "stage1" / "last.pth"),
                       "--iters", "6"], 1, tmp_path)
    assert logged_iters(work / "stage1" / "log.jsonl") == [5, 6]
