"""Make the package importable when the benchmarks run in place (`pytest benchmarks`), and the
shared case modules (cases.py, train_cases.py) beside this file."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE.parent), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)
