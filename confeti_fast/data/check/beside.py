"""Where the check's files go beside a dataset (`root/name`, else ~/.cache/confeti_fast) and
their atomic write: the header cache (cache.py) and the bad-pair list (report.py) use both."""
import hashlib
import os
from pathlib import Path


def _beside_data(root, name, fallback_stem):
    """`root/name`, then a per-root file in ~/.cache/confeti_fast (as data/rcs.py does)."""
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    suffix = Path(name).suffix
    return [Path(root) / name, Path.home() / ".cache" / "confeti_fast" / f"{fallback_stem}-{digest}{suffix}"]


def _write_first(paths, text):
    """Write `text` atomically to the first writable path; that path, or None."""
    for path in paths:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: ranks check at once
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            tmp.replace(path)
            return path
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
    return None
