"""python -m confeti_fast.data.demo: see cli.main."""
from ...errors import run_cli
from .cli import main

# guarded like any script, so that importing this module does not run the command
if __name__ == "__main__":
    raise SystemExit(run_cli(main))
