"""Where presets live and how a config file or preset is read (one dict literal, `ast.literal_eval`).

Presets live in the repository's `configs/` and are shipped inside the package as
`confeti_fast.configs`; in a checkout used in place, the finder in `confeti_fast/__init__.py`
maps that name to `configs/`.
"""
import ast
from importlib import resources
from pathlib import Path

from ..errors import ConfetiError

PRESET_PACKAGE = "confeti_fast.configs"


def _preset_dir():
    """The installed presets, or the repository's `configs/` when the package runs in place."""
    try:
        return resources.files(PRESET_PACKAGE)
    except ModuleNotFoundError:
        # this file is confeti_fast/config/presets.py: parents[2] is the repository root
        return Path(__file__).resolve().parents[2] / "configs"


def preset_names():
    """The presets' names (the .py files of the preset folder, without `_` ones)."""
    return sorted(
        p.name[:-3] for p in _preset_dir().iterdir()
        if p.name.endswith(".py") and not p.name.startswith("_")
    )


def _read_literal(text, origin):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ConfetiError(f"config {origin} is not a plain Python dict literal: {err}") from None
    if not isinstance(value, dict):
        raise ConfetiError(f"config {origin} must hold one dict literal, found {type(value).__name__}")
    return value


def read_raw(preset_or_path):
    """(dict, origin for messages, whether it is a preset) of a preset name or a .py file."""
    path = Path(preset_or_path)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise ConfetiError(f"config file {path} does not exist")
        return _read_literal(path.read_text(), path), str(path), False
    name = str(preset_or_path)
    if name not in preset_names():
        raise ConfetiError(
            f"unknown preset '{name}' (--config takes a preset name or a .py file); "
            f"presets: {', '.join(preset_names())}"
        )
    text = _preset_dir().joinpath(f"{name}.py").read_text()
    return _read_literal(text, f"preset '{name}'"), f"preset '{name}'", True
