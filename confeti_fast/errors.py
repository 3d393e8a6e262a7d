"""User-facing errors.

Everything a user can get wrong (paths, presets, files, checkpoints, options) raises
`ConfetiError` with a one-line message that names the file or option. The CLIs print it
without a traceback and exit with status 2.
"""


class ConfetiError(Exception):
    """A problem with the user's input, reported as one readable line."""


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
        print(stop, file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None
