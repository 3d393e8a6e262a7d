"""Per-file facts: a header decoded by Pillow (size, mode, format; a PNG's bit depth and colour
type), the format's end marker, the label checks (modes, SYNTHIA's PNG header), the problems
of one pair, and the full decode of one file with the training readers."""
import os

from PIL import Image, UnidentifiedImageError

from ..io import read_rgb, read_train_ids
from .report import READ_ERRORS, _one_line, read_failure

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The end markers searched for in a file's last _TAIL bytes (writers may pad after them):
# IEND's type and CRC are the same in every PNG; a JPEG ends with EOI.
_END_MARKERS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}
_TAIL = 1024
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
LABEL_MODES = ("L", "P")  # io.read_label_ids: 8-bit grey or palette
SYNTHIA_COLOR_TYPES = {0: "grey", 2: "RGB", 6: "RGBA"}  # io.read_synthia_ids: 1, 3 or 4 channels


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


def decode_file(kind, role, path):
    """Fully decode one file with the training readers (data/io.py): None, or why it fails."""
    try:
        read_rgb(path) if role == "image" else read_train_ids(path, kind)
    except READ_ERRORS as err:
        return read_failure(err, path)
    return None
