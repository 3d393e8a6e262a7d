"""Configs: plain Python literal files (a dict), read with `ast.literal_eval`.

A config file holds one dict literal. It may name a `_base_` preset whose values it
overrides (nested dicts merge key by key). Presets live in `configs/` and are shipped
inside the package as `confeti_fast.configs`. Training writes the fully resolved config
(no `_base_`) as `config.py` in its work dir, and `test.py` reads that file back.
"""
import ast
import copy
import pprint
from importlib import resources
from pathlib import Path

from .errors import ConfetiError

PRESET_PACKAGE = "confeti_fast.configs"


def _preset_dir():
    """The installed presets, or the repository's `configs/` when the package runs in place."""
    try:
        return resources.files(PRESET_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"

# Top-level keys a resolved config must have, with the type each one must be.
REQUIRED_KEYS = {
    "name": str,
    "seed": int,
    "num_classes": int,
    "eval_classes": str,
    "model": dict,
    "source": dict,
    "target": dict,
    "pipeline": dict,
    "rcs": dict,
    "batch": dict,
    "stages": dict,
    "evaluation": dict,
    "data_loader": dict,
    "method": str,
    "optimizer": dict,
    "train": dict,
    "cut": dict,
}
# Optional top-level keys: `runtime` (how the step executes, see runtime.py), each choice
# "auto" (the device's default) or one of these values.
OPTIONAL_KEYS = {"runtime": dict}
RUNTIME_CHOICES = {
    "amp": ("fp32", "bf16"),
    "channels_last": (False, True),
    "compile": (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "fused_optimizer": (False, True),
    "check_finite": ("step", "log"),
    "sync_bn": (False, True),
    "deterministic": (False, True),
}
METHODS = ("confeti", "source_only")
EVAL_CLASS_SETS = ("all", "synthia16")
DATASET_TYPES = ("gta5", "cityscapes", "synthia")


def preset_names():
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


def _read_raw(preset_or_path):
    path = Path(preset_or_path)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise ConfetiError(f"config file {path} does not exist")
        return _read_literal(path.read_text(), path), str(path)
    name = str(preset_or_path)
    if name not in preset_names():
        raise ConfetiError(
            f"unknown preset '{name}' (--config takes a preset name or a .py file); "
            f"presets: {', '.join(preset_names())}"
        )
    text = _preset_dir().joinpath(f"{name}.py").read_text()
    return _read_literal(text, f"preset '{name}'"), f"preset '{name}'"


def merge(base, override):
    """Recursively merge `override` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(preset_or_path, overrides=None):
    """Read a preset name or config file, resolve `_base_` chains, apply overrides and validate."""
    raw, origin = _read_raw(preset_or_path)
    seen = [origin]
    while "_base_" in raw:
        base_name = raw.pop("_base_")
        base, base_origin = _read_raw(base_name)
        if base_origin in seen:
            raise ConfetiError(f"config {origin}: `_base_` chain loops through {base_origin}")
        seen.append(base_origin)
        raw = merge(base, raw)
    cfg = merge(raw, overrides or {})
    validate_config(cfg, origin)
    return cfg


def _validate_runtime(runtime, origin):
    if not isinstance(runtime, dict):
        raise ConfetiError(f"{origin}: 'runtime' must be a dict, got {runtime!r}")
    for key, value in runtime.items():
        if key not in RUNTIME_CHOICES:
            raise ConfetiError(f"{origin}: unknown runtime key '{key}'; known: {', '.join(RUNTIME_CHOICES)}")
        if value != "auto" and value not in RUNTIME_CHOICES[key]:
            raise ConfetiError(f"{origin}: runtime.{key} must be 'auto' or one of {RUNTIME_CHOICES[key]}, "
                               f"got {value!r}")


def validate_config(cfg, origin="config"):
    for key, kind in REQUIRED_KEYS.items():
        if key not in cfg:
            raise ConfetiError(f"{origin}: missing key '{key}'")
        if not isinstance(cfg[key], kind):
            raise ConfetiError(f"{origin}: '{key}' must be a {kind.__name__}, got {cfg[key]!r}")
    unknown = sorted(set(cfg) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ConfetiError(f"{origin}: unknown key(s) {', '.join(unknown)}")
    _validate_runtime(cfg.get("runtime", {}), origin)
    if cfg["method"] not in METHODS:
        raise ConfetiError(f"{origin}: method must be one of {METHODS}, got {cfg['method']!r}")
    if cfg["eval_classes"] not in EVAL_CLASS_SETS:
        raise ConfetiError(f"{origin}: eval_classes must be one of {EVAL_CLASS_SETS}, got '{cfg['eval_classes']}'")
    for side in ("source", "target"):
        if cfg[side].get("type") not in DATASET_TYPES:
            raise ConfetiError(f"{origin}: {side}.type must be one of {DATASET_TYPES}, got {cfg[side].get('type')!r}")
    if cfg["model"].get("depth") not in (18, 34, 50, 101):
        raise ConfetiError(f"{origin}: model.depth must be 18, 34, 50 or 101, got {cfg['model'].get('depth')!r}")


def dump_config(cfg, path):
    """Write a resolved config as a readable, diffable literal file that `load_config` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = pprint.pformat(cfg, indent=1, width=100, sort_dicts=True)
    path.write_text(f"# Resolved confeti_fast config ({cfg['name']}); read by test.py and --resume.\n{body}\n")
    return path
