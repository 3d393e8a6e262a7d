"""The dataset check run before any training (docs/training.md, "Checking a dataset").

Every (image, label) pair is checked cheaply: both files exist, both headers decode (Pillow
parses the header only), each file reaches its format's end marker (a PNG's IEND chunk, a
JPEG's EOI: a copy cut short fails here although its header is intact), the label has the
image's size and a mode its reader takes. Each file's header facts are cached, keyed by
(path, size, mtime_ns), in `<root>/.confeti_data_check.json` (or ~/.cache/confeti_fast/ when the
data folder is read-only, as the RCS statistics are; no cache when neither can be written), so
a second start reads no header. `full=True` also decodes every file with the training
readers, which catches a damaged body behind an intact header and end marker.

All bad pairs are found in one pass. `data.bad_samples` decides what follows: "error" refuses
the data (`DataCheckError`, one line), "skip" leaves the bad pairs out of the index. A sample
that fails to decode later, while training, raises `BadSampleError` (see data/loader.py).
`python -m confeti_fast.data.check CONFIG` runs the check alone (check/__main__.py).

Here: the policy and the pass over a dataset. files.py reads one file's facts (header, end
marker, label checks); cache.py keeps them per file; report.py holds the errors, the messages
and the bad-pair list file; beside.py places and writes the files kept beside the data.
"""
import contextlib
import sys
from concurrent.futures import ProcessPoolExecutor

from ...errors import ConfetiError
from .cache import CACHE_NAME, FactCache
from .files import decode_file, pair_problems
from .report import (READ_ERRORS, BadSampleError, DataCheckError, _plural, describe, error_line, read_failure,
                     summary, write_reports)

# Imported from here elsewhere (data/, trainer.py, check/__main__.py, the tests).
__all__ = ["CACHE_NAME", "POLICIES", "READ_ERRORS", "BadSampleError", "DataCheckError", "bad_samples_policy",
           "check_datasets", "describe", "find_bad", "read_failure", "summary", "write_reports"]

POLICIES = ("error", "skip")


def bad_samples_policy(cfg):
    """`data.bad_samples` of a config ("error" when absent), checked."""
    section = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    value = section.get("bad_samples", "error")
    if value not in POLICIES:
        raise ConfetiError(f"data.bad_samples must be one of {POLICIES}, got {value!r}")
    return value


# ---------------------------------------------------------------- a dataset


def _decode_star(args):
    return decode_file(*args)


def _needs_decode(facts):
    return facts is not None and not ({"error", "body", "full"} & set(facts))


def find_bad(dataset, full=False, progress=True, workers=1):
    """[(index, path, reason)] of every bad pair of `dataset`, in index order. `full` also
    decodes every file whose header is good (in `workers` processes); the cache keeps that
    verdict too, so a later header check still refuses a file whose body failed."""
    from tqdm import tqdm

    cache = FactCache(dataset.root)
    # delay: a cached check takes well under a second and shows no bar.
    bar = tqdm(dataset.samples, desc=f"checking {describe(dataset)} data ({dataset.root})", unit="pair",
               disable=not progress, delay=1.0, leave=False)
    facts = [(cache.facts(image_path), cache.facts(label_path)) for image_path, label_path in bar]
    if full:
        todo = [(dataset.kind, role, path) for pair, pair_facts in zip(dataset.samples, facts)
                for role, path, f in zip(("image", "label"), pair, pair_facts) if _needs_decode(f)]
        with contextlib.ExitStack() as stack:
            results = map(_decode_star, todo)
            if workers > 1 and len(todo) > 1:
                pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(todo))))
                results = pool.map(_decode_star, todo, chunksize=4)
            decoded = tqdm(results, total=len(todo), disable=not progress, leave=False,
                           desc=f"decoding {describe(dataset)} files", unit="file")
            for done, ((_, _, path), reason) in enumerate(zip(todo, decoded), 1):
                cache.update(path, **({"body": reason} if reason else {"full": True}))
                if done % 1000 == 0:  # a full pass takes long: an interrupted one keeps what it did
                    cache.save()
    bad = []
    for index, ((image_path, label_path), (image, label)) in enumerate(zip(dataset.samples, facts)):
        problems = pair_problems(dataset.kind, image_path, label_path, image, label)
        if problems:
            (path, reason), more = problems[0], problems[1:]
            bad.append((index, path, reason + "".join(f"; also {p}: {r}" for p, r in more)))
    cache.save()
    return bad


# ---------------------------------------------------------------- the policy


def check_datasets(datasets, policy="error", report=None, full=False, progress=True, quiet=False, workers=1):
    """Check every pair of `datasets` (data/datasets.py SegDatasets) before training.

    `report`: the file that lists every bad pair (the trainer's `work_dir/stage<N>/bad_samples.txt`);
    None puts each dataset's list beside its data. Under "error" any bad pair raises one
    DataCheckError after the first SHOWN are printed; under "skip" they are left out of each
    dataset's index (`dataset.samples`, so RCS statistics too), recorded in `dataset.left_out`,
    with one line printed per dataset. `quiet` prints nothing (ranks other than 0).
    Returns [(dataset, [(index, path, reason)])].
    """
    if policy not in POLICIES:
        raise ConfetiError(f"data.bad_samples must be one of {POLICIES}, got {policy!r}")
    found = [(ds, find_bad(ds, full, progress, workers)) for ds in datasets]
    where = write_reports(found, report)
    bad_sets = [(ds, bad) for ds, bad in found if bad]
    if not bad_sets:
        return found
    if policy == "error":
        if not quiet:
            print(summary(bad_sets, where), file=sys.stderr, flush=True)
        raise DataCheckError(error_line(bad_sets, where), [(p, r) for _, bad in bad_sets for _, p, r in bad],
                             sorted({where[id(ds)] for ds, _ in bad_sets}))
    for ds, bad in bad_sets:
        total, drop = len(ds.samples), {index for index, _, _ in bad}
        ds.left_out = [(path, reason) for _, path, reason in bad]
        ds.samples = [pair for i, pair in enumerate(ds.samples) if i not in drop]
        if not ds.samples:
            raise ConfetiError(f"every one of the {total} pairs of the {describe(ds)} data at {ds.root} is bad "
                               f"(first {bad[0][1]}: {bad[0][2]}); list in {where[id(ds)]}")
        if not quiet:
            print(f"data check: left out {_plural(len(bad))} of {total} in the "
                  f"{describe(ds)} data at {ds.root} (data.bad_samples=skip); list in {where[id(ds)]}", flush=True)
    return found
