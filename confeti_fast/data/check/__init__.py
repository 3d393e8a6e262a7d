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
"""
import contextlib
import hashlib
import json
import os
import stat
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ...errors import ConfetiError
from ..io import read_rgb, read_train_ids

POLICIES = ("error", "skip")
CACHE_NAME = ".confeti_data_check.json"
CACHE_VERSION = 1
REPORT_NAME = "bad_samples.txt"
SHOWN = 5  # bad pairs printed before the one-line error; the report file holds them all
SKIP_HINT = "--cfg-options data.bad_samples=skip"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The end markers searched for in a file's last _TAIL bytes (writers may pad after them):
# IEND's type and CRC are the same in every PNG; a JPEG ends with EOI.
_END_MARKERS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}
_TAIL = 1024
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
LABEL_MODES = ("L", "P")  # io.read_label_ids: 8-bit grey or palette
SYNTHIA_COLOR_TYPES = {0: "grey", 2: "RGB", 6: "RGBA"}  # io.read_synthia_ids: 1, 3 or 4 channels


def bad_samples_policy(cfg):
    """`data.bad_samples` of a config ("error" when absent), checked."""
    section = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    value = section.get("bad_samples", "error")
    if value not in POLICIES:
        raise ConfetiError(f"data.bad_samples must be one of {POLICIES}, got {value!r}")
    return value


def _one_line(text):
    return " ".join(str(text).split())


READ_ERRORS = (ConfetiError, OSError, ValueError)  # what reading one file may raise (data/io.py, Pillow)


def read_failure(err, path):
    """Why reading `path` failed, in one line; io's messages name the file, this leaves it out
    (the error or report names it once)."""
    if isinstance(err, ConfetiError):
        return _one_line(str(err).replace(f" {Path(path)}", "")).rstrip(": ")
    return f"{type(err).__name__}: {_one_line(err)}"


class BadSampleError(ConfetiError):
    """A sample that cannot be read while training: `.path` is the file, `.reason` why.

    torch re-raises a DataLoader worker's exception as `type(err)(formatted traceback)`, so a
    lone argument is parsed back into the path and reason: the trainer catches this class, and
    its message stays one line, from a worker too.
    """

    _LEAD = "bad sample "
    _HINT = f"; {SKIP_HINT} draws the next readable sample instead"

    def __init__(self, path, reason=None):
        if reason is None:
            path, reason = self._parse(str(path))
        self.path, self.reason = str(path), _one_line(reason)
        super().__init__(f"{self._LEAD}{self.path}: {self.reason}{self._HINT}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)

    @classmethod
    def _parse(cls, text):
        lines = text.strip().splitlines() or [""]
        # A worker's traceback ends with "<module>.BadSampleError: <message>".
        message = lines[-1].partition("BadSampleError: ")[2] or lines[-1]
        message = message.removeprefix(cls._LEAD).removesuffix(cls._HINT)
        path, sep, reason = message.partition(": ")
        return (path, reason) if sep else (message, "unreadable")


class DataCheckError(ConfetiError):
    """Bad pairs found by the check under data.bad_samples="error". `.bad` holds every
    (path, reason), `.reports` the files that list them."""

    def __init__(self, message, bad=(), reports=()):
        super().__init__(message)
        self.bad, self.reports = list(bad), list(reports)

    def __reduce__(self):
        return type(self), (str(self), self.bad, self.reports)


# ---------------------------------------------------------------- one file


def read_facts(path):
    """The header facts of an image file: size, Pillow mode and format, a PNG's bit depth and
    colour type, and "error" when the header does not decode or the end marker is missing."""
    try:
        with open(path, "rb") as f:
            head = f.read(33)
            f.seek(0)
            with Image.open(f) as img:  # reads the header, not the pixel data
                facts = {"size": list(img.size), "mode": img.mode, "format": img.format}
            if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
                facts["depth"], facts["color"] = head[24], head[25]
            marker = _END_MARKERS.get(facts["format"])
            if marker is not None:
                end = f.seek(0, os.SEEK_END)
                f.seek(max(0, end - _TAIL))
                if marker not in f.read():
                    facts["error"] = f"cut short: no {facts['format']} end marker after the header (a truncated copy?)"
    except UnidentifiedImageError:  # its message holds the file object's repr
        return {"error": "header does not decode (not an image format Pillow knows)"}
    except _PIL_ERRORS as err:
        return {"error": f"header does not decode ({_one_line(err)})"}
    return facts


def _describe(facts):
    text = f"{facts['format']} mode {facts['mode']}"
    if "color" in facts:
        text += f", {facts['depth']}-bit colour type {facts['color']}"
    return text


def _label_problem(kind, facts):
    if kind == "synthia":
        if facts["format"] != "PNG" or facts.get("color") not in SYNTHIA_COLOR_TYPES or facts["depth"] not in (8, 16):
            return f"SYNTHIA labels are grey, RGB or RGBA PNGs of 8 or 16 bits, found {_describe(facts)}"
    elif facts["mode"] not in LABEL_MODES:
        return f"label mode {facts['mode']}: {kind} labels are 8-bit grey (L) or palette (P) PNGs"
    return None


def pair_problems(kind, image_path, label_path, image, label):
    """[(path, reason)] of one pair from its files' facts (None: the file is missing)."""
    problems = []
    for path, facts, role in ((image_path, image, "image"), (label_path, label, "label")):
        if facts is None:
            problems.append((path, "not found" if role == "image" else f"not found (the label of {image_path})"))
        elif "error" in facts:
            problems.append((path, facts["error"]))
        elif "body" in facts:  # a full decode failed earlier (the cache remembers)
            problems.append((path, f"does not decode: {facts['body']}"))
        elif role == "label" and (problem := _label_problem(kind, facts)):
            problems.append((path, problem))
    if not problems and image["size"] != label["size"]:
        (lw, lh), (iw, ih) = label["size"], image["size"]
        problems.append((label_path, f"is {lw}x{lh} but its image {image_path} is {iw}x{ih}"))
    return problems


# ---------------------------------------------------------------- the cache beside the data


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


class FactCache:
    """Per-file header facts of one data root, keyed by (path under root, size, mtime_ns)."""

    def __init__(self, root):
        self.root, self.paths = Path(root), _beside_data(root, CACHE_NAME, "check")
        self._prefix = os.path.join(str(self.root), "")
        self.files, self.dirty = {}, False
        for path in self.paths:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
                self.files = data["files"]
                break

    def _key(self, path):
        # The readers' paths are root/...: slicing is 5x cheaper than relpath at 50k files.
        path = str(path)
        return path[len(self._prefix):] if path.startswith(self._prefix) else os.path.relpath(path, self.root)

    def facts(self, path):
        """The facts of `path` (read from its header unless cached), or None if it is missing."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        key, stamp = self._key(path), [st.st_size, st.st_mtime_ns]
        entry = self.files.get(key)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp:
            return entry[2]
        facts = read_facts(path)
        self.files[key], self.dirty = stamp + [facts], True
        return facts

    def update(self, path, **values):
        entry = self.files.get(self._key(path))
        if entry is not None:
            entry[2].update(values)
            self.dirty = True

    def save(self):
        if self.dirty:
            _write_first(self.paths, json.dumps({"version": CACHE_VERSION, "files": self.files}, separators=(",", ":")))
            self.dirty = False


# ---------------------------------------------------------------- a dataset


def describe(dataset):
    return f"{dataset.kind} {dataset.split or 'train'}"


def decode_file(kind, role, path):
    """Fully decode one file with the training readers (data/io.py): None, or why it fails."""
    try:
        read_rgb(path) if role == "image" else read_train_ids(path, kind)
    except READ_ERRORS as err:
        return read_failure(err, path)
    return None


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


# ---------------------------------------------------------------- the report file


def default_report(dataset):
    """Where a dataset's list goes without a work dir: beside its data (or ~/.cache/confeti_fast)."""
    return _beside_data(dataset.root, REPORT_NAME, "bad_samples")


def _section_title(dataset):
    return f"## {describe(dataset)} data at {Path(dataset.root).resolve()}"


def write_report(paths, sections):
    """Write {title: [(path, reason)]} sections as `path<TAB>reason` lines to the first
    writable of `paths`. Sections of other datasets already in the file are kept (the
    training sets and the val set can share one file); an empty section is removed.
    Returns the file written, or None (nothing to write, or no path writable)."""
    kept, title = {}, None
    try:
        for line in Path(paths[0]).read_text().splitlines():
            if line.startswith("## "):
                title = line.split(": ", 1)[0]
                kept[title] = []
            elif title and line and not line.startswith("#"):
                kept[title].append(line)
    except OSError:
        pass
    for name, entries in sections.items():
        kept[name] = [f"{path}\t{reason}" for path, reason in entries]
    kept = {name: lines for name, lines in kept.items() if lines}
    if not kept:  # every dataset of the file is clean now: a stale list would mislead
        try:
            Path(paths[0]).unlink(missing_ok=True)
        except OSError:
            pass
        return None
    body = ["# confeti_fast data check: bad (image, label) pairs, one a line: path<TAB>reason"]
    for name, lines in kept.items():
        body += [f"{name}: {len(lines)} bad pair{'s' if len(lines) != 1 else ''}"] + lines
    return _write_first([Path(p) for p in paths], "\n".join(body) + "\n")


def write_reports(found, report):
    """{id(dataset): the report file holding its bad pairs (or a note why none could be written)}."""
    where = {}
    groups = [([Path(report)], found)] if report else [(default_report(ds), [(ds, bad)]) for ds, bad in found]
    for paths, members in groups:
        if not any(bad for _, bad in members) and not Path(paths[0]).is_file():
            continue  # clean and no stale list to clear: write nothing
        written = write_report(paths, {_section_title(ds): [(p, r) for _, p, r in bad] for ds, bad in members})
        for ds, _ in members:
            where[id(ds)] = str(written) if written else f"(not written: {paths[0]} is not writable)"
    return where


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


def _plural(n):
    return f"{n} bad pair{'s' if n != 1 else ''}"


def _where(bad_sets):
    if len(bad_sets) == 1:
        ds = bad_sets[0][0]
        return f"the {describe(ds)} data at {ds.root}"
    return ", ".join(f"{describe(ds)} at {ds.root} ({len(bad)})" for ds, bad in bad_sets)


def error_line(bad_sets, where):
    """The one-line refusal: count, first file and reason, where the list is, how to skip."""
    total = sum(len(bad) for _, bad in bad_sets)
    _, path, reason = bad_sets[0][1][0]
    files = ", ".join(dict.fromkeys(where[id(ds)] for ds, _ in bad_sets))
    return (f"{_plural(total)} in {_where(bad_sets)}; first {path}: {reason}; full list in {files}; "
            f"add {SKIP_HINT} to leave them out")


def summary(bad_sets, where):
    """A few lines: the count and the first SHOWN bad pairs with their reasons."""
    total = sum(len(bad) for _, bad in bad_sets)
    lines = [f"data check: {_plural(total)} in {_where(bad_sets)}:"]
    shown = [(p, r) for _, bad in bad_sets for _, p, r in bad][:SHOWN]
    lines += [f"  {path}: {reason}" for path, reason in shown]
    files = ", ".join(dict.fromkeys(where[id(ds)] for ds, _ in bad_sets))
    more = total - len(shown)
    lines.append(f"  ({more} more; all {total} in {files})" if more else f"  (listed in {files})")
    return "\n".join(lines)
