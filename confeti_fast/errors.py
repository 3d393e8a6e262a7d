"""User-facing errors.

Everything a user can get wrong (paths, presets, files, checkpoints, options) raises
`ConfetiError` with a one-line message that names the file or option. The CLIs print it
without a traceback and exit with status 2.
"""
import contextlib
import shutil
from pathlib import Path


class ConfetiError(Exception):
    """A problem with the user's input, reported as one readable line."""


def write_failure(err, folder):
    """Why a write into `folder` failed, in a few words."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    try:
        if shutil.disk_usage(folder).free < 64 * 2 ** 20:
            return "No space left on device"
    except OSError:
        pass
    return " ".join(str(err).split())[:160]


@contextlib.contextmanager
def writing(path):
    """Around the writing of a log, a picture or a prediction: an OSError becomes one line
    naming the file and the reason."""
    try:
        yield
    except OSError as err:
        raise ConfetiError(f"cannot write {path}: {write_failure(err, Path(path).parent)}") from None


def run_cli(main, argv=None):
    """Run a CLI entry point, turning ConfetiError into `error: ...` and exit status 2."""
    import sys

    from .preemption import StopRequested

    try:
        return main(argv)
    except ConfetiError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except StopRequested as stop:  # a preemption: the state is saved, the run can go on later
        if stop.announce:  # one line per run, not per rank
            print(stop, file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None
