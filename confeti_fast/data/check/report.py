"""What the check says: the one-line messages of `BadSampleError` and `DataCheckError`, the
refusal and summary printed for bad pairs, and the bad-pair list file (`bad_samples.txt`,
`path<TAB>reason` lines in one section per dataset)."""
from pathlib import Path

from ...errors import ConfetiError
from .beside import _beside_data, _write_first

REPORT_NAME = "bad_samples.txt"
SHOWN = 5  # bad pairs printed before the one-line error; the report file holds them all
SKIP_HINT = "--cfg-options data.bad_samples=skip"


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


def describe(dataset):
    return f"{dataset.kind} {dataset.split or 'train'}"


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
