"""Stopping a run cleanly when the cluster asks: SIGTERM (what SLURM and Kubernetes send
before a preemption) or SIGINT (Ctrl-C).

While training, these signals only raise a flag; the trainer looks at it between iterations,
so the iteration under way finishes, a checkpoint is written, and the run exits with
128 + the signal's number after printing how to resume. A second signal while the checkpoint
is being written is noted and ignored: the write (temporary file, then rename) completes, and
a SIGKILL during it leaves the previous checkpoint in place.
"""
import os
import shlex
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """The run stopped on a signal after saving its state; `exit_code` is 128 + the signal,
    `announce` whether this process prints the line (rank 0)."""

    def __init__(self, message, signum, announce=True):
        super().__init__(message)
        self.exit_code, self.announce = 128 + signum, announce


class SignalFlag:
    """Context manager: SIGTERM and SIGINT set `received` (the first signal's number) instead
    of ending the process; the previous handlers come back on exit. Outside the main thread
    (where Python cannot install handlers) it does nothing."""

    def __init__(self, announce=True):
        self.received, self.announce, self._previous = None, announce, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _note(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            message = f"{name} received: stopping after this iteration, with a checkpoint"
        else:
            message = f"{name} received again: already stopping, the checkpoint is being written"
        if self.announce:
            print(message, file=sys.stderr, flush=True)


def resume_command(argv=None):
    """The command line that continues this run: the same one, with --resume auto."""
    argv = list(sys.argv if argv is None else argv)
    if "--resume" in argv:
        at = argv.index("--resume")
        del argv[at:at + 2]
    argv = [arg for arg in argv if not arg.startswith("--resume=")]
    command = shlex.join(["python", *argv, "--resume", "auto"])  # quoted: it is meant to be pasted
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a worker cannot see torchrun's own options
        return f"the same torchrun command, its script part being: {command[len('python '):]}"
    return command
