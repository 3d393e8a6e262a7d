import sys
from pathlib import Path

# Test helpers (pngwriter) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
