"""Reading a config (its `_base_` chain of presets and files, checked layer by layer) and
writing a resolved one."""
import pprint
from pathlib import Path

from ..errors import ConfetiError, writing
from .overrides import merge
from .presets import read_raw
from .schema import build_schema, check_keys, validate_config


def load_config(preset_or_path, overrides=None, overrides_origin="overrides"):
    """Read a preset name or config file, resolve `_base_` chains, apply overrides and validate.

    Each file of the chain, and `overrides` (named `overrides_origin` in errors, e.g.
    '--cfg-options'), is checked against the schema before they are merged."""
    raw, origin, is_preset = read_raw(preset_or_path)
    top, seen, chain = origin, [], []  # chain: (dict without _base_, origin, is_preset), top first
    while True:
        if origin in seen:
            raise ConfetiError(f"config {top}: `_base_` chain loops through {origin}")
        seen.append(origin)
        base_name = raw.pop("_base_", None)
        chain.append((raw, origin, is_preset))
        if base_name is None:
            break
        if not isinstance(base_name, str):
            raise ConfetiError(f"{origin}: `_base_` must be a preset name or a file path, got {base_name!r}")
        raw, origin, is_preset = read_raw(base_name)
    schema = build_schema([layer for layer, _, preset in chain if preset])
    layers = [(layer, layer_origin) for layer, layer_origin, _ in reversed(chain)]
    if overrides:
        layers.append((overrides, overrides_origin))
    cfg = {}
    for layer, layer_origin in layers:
        check_keys(layer, schema, layer_origin)
        cfg = merge(cfg, layer)
    validate_config(cfg, top)
    return cfg


def dump_config(cfg, path):
    """Write a resolved config as a readable, diffable literal file that `load_config` reads back."""
    path = Path(path)
    body = pprint.pformat(cfg, indent=1, width=100, sort_dicts=True)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Resolved confeti_fast config ({cfg['name']}); read by test.py and --resume.\n{body}\n")
    return path
