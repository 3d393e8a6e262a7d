"""Configs: plain Python literal files (a dict), read with `ast.literal_eval`.

A config file holds one dict literal. It may name a `_base_` preset whose values it
overrides (nested dicts merge key by key). Presets live in `configs/` and are shipped
inside the package as `confeti_fast.configs`. Training writes the fully resolved config
(no `_base_`) as `config.py` in its work dir, and `test.py` reads that file back.

Every key is checked, at any depth: the schema is the merged chain of presets under a file
(the root preset `gta2cs` for a file without a preset below it, such as a resolved
`config.py`). A key the schema lacks is a one-line error naming its full dotted path and the
nearest valid key; a value of another type than the schema's is one too (an int stands for a
float, a tuple for a list; None is accepted where the schema holds None or documents the key
as optional, `OPTIONAL_VALUES`). `--cfg-options key.path=value` items (`parse_cfg_options`)
are checked the same way.
"""
import ast
import copy
import difflib
import pprint
from importlib import resources
from pathlib import Path

from .errors import ConfetiError

PRESET_PACKAGE = "confeti_fast.configs"
# The preset every chain ends in: the schema of a file with no preset below it.
ROOT_PRESET = "gta2cs"
# Keys documented as optional: None, or a value of this type.
OPTIONAL_VALUES = {
    "model.pretrained": str,  # None: no ImageNet init
    "source.generate": str,  # None: the data is read from root as it is
    "target.generate": str,
    "evaluation.scale": list,  # None: inference at the image's full resolution
}


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
        return _read_literal(path.read_text(), path), str(path), False
    name = str(preset_or_path)
    if name not in preset_names():
        raise ConfetiError(
            f"unknown preset '{name}' (--config takes a preset name or a .py file); "
            f"presets: {', '.join(preset_names())}"
        )
    text = _preset_dir().joinpath(f"{name}.py").read_text()
    return _read_literal(text, f"preset '{name}'"), f"preset '{name}'", True


def merge(base, override):
    """Recursively merge `override` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(preset_or_path, overrides=None, overrides_origin="overrides"):
    """Read a preset name or config file, resolve `_base_` chains, apply overrides and validate.

    Each file of the chain, and `overrides` (named `overrides_origin` in errors, e.g.
    '--cfg-options'), is checked against the schema before they are merged."""
    raw, origin, is_preset = _read_raw(preset_or_path)
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
        raw, origin, is_preset = _read_raw(base_name)
    schema = _schema([layer for layer, _, preset in chain if preset])
    layers = [(layer, layer_origin) for layer, layer_origin, _ in reversed(chain)]
    if overrides:
        layers.append((overrides, overrides_origin))
    cfg = {}
    for layer, layer_origin in layers:
        check_keys(layer, schema, layer_origin)
        cfg = merge(cfg, layer)
    validate_config(cfg, top)
    return cfg


# --------------------------------------------------------------------------------------
# The schema: every key of the preset chain, with the kinds of value it takes
# --------------------------------------------------------------------------------------

_KIND_NAMES = {bool: "True or False", int: "an int", float: "a number", str: "a string", list: "a list",
               dict: "a dict", type(None): "None"}


def _kind(value):
    if isinstance(value, tuple):
        return list
    return type(value) if type(value) in _KIND_NAMES else object


def _add_kinds(tree, layer, prefix=""):
    for key, value in layer.items():
        path = prefix + str(key)
        node = tree.setdefault(key, {"kinds": set(), "children": {}})
        node["kinds"].add(_kind(value))
        if path in OPTIONAL_VALUES:
            node["kinds"] |= {type(None), OPTIONAL_VALUES[path]}
        if isinstance(value, dict):
            _add_kinds(node["children"], value, path + ".")


def _schema(preset_layers):
    """{key: {'kinds': set of types, 'children': {...}}} of the root preset and `preset_layers`
    (the presets of a chain, top first) merged."""
    root, _, _ = _read_raw(ROOT_PRESET)
    root.pop("_base_", None)
    tree = {}
    for layer in [root] + list(reversed(preset_layers)):
        _add_kinds(tree, layer)
    return tree


def _accepts(kinds, value):
    kind = _kind(value)
    if kinds == {type(None)}:  # the schema's value is None: any value may replace it
        return True
    return kind in kinds or (kind is int and float in kinds)


def _expected(kinds):
    if float in kinds:
        kinds = kinds - {int}
    names = [_KIND_NAMES.get(k, k.__name__) for k in sorted(kinds, key=lambda k: (k is type(None), k.__name__))]
    return " or ".join(names)


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problems(layer, tree, prefix):
    """(unknown keys as (path, message), wrong values as messages) of `layer`, in file order."""
    unknown, wrong = [], []
    for key, value in layer.items():
        path = prefix + str(key)
        if key not in tree:
            if not isinstance(key, str) and str(key) in tree:
                unknown.append((path, f"key {key!r} at '{path}' must be the string '{key}'"))
                continue
            known = [str(k) for k in tree] + ([] if prefix else list(OPTIONAL_KEYS))
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = (f"did you mean '{prefix}{near[0]}'?" if near else
                    f"valid keys{' of ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(sorted(known))}")
            unknown.append((path, f"unknown key '{path}' ({hint})"))
            continue
        node = tree[key]
        if not _accepts(node["kinds"], value):
            wrong.append(f"'{path}' must be {_expected(node['kinds'])}, got {_short(value)}")
        elif isinstance(value, dict) and node["children"]:
            more_unknown, more_wrong = _problems(value, node["children"], path + ".")
            unknown += more_unknown
            wrong += more_wrong
    return unknown, wrong


def check_keys(layer, schema, origin):
    """One-line ConfetiError for the first unknown key (with the nearest valid one) or wrongly
    typed value in `layer`, at any depth; `origin` (the file, or '--cfg-options') leads it."""
    if not isinstance(layer, dict):
        raise ConfetiError(f"{origin}: must hold one dict, found {type(layer).__name__}")
    body = {k: v for k, v in layer.items() if k != "runtime"}
    unknown, wrong = _problems(body, schema, "")
    if unknown:
        rest = [path for path, _ in unknown[1:]]
        raise ConfetiError(f"{origin}: {unknown[0][1]}" + (f"; also unknown: {', '.join(rest)}" if rest else ""))
    if wrong:
        raise ConfetiError(f"{origin}: {wrong[0]}")
    if "runtime" in layer:
        _validate_runtime(layer["runtime"], origin)


def parse_cfg_options(items, origin="--cfg-options"):
    """`key.path=value` strings -> a nested override dict (mmseg's --cfg-options). Each value is
    read as a Python literal (`ast.literal_eval`: 4, 1e-4, None, [512, 512], 'text'), falling
    back to the plain string (so `model.pretrained=weights/r101.pth` needs no quotes)."""
    out = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfetiError(f"{origin} takes key.path=value items, got {item!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = text.strip()
        nested = value
        for part in reversed(parts):
            nested = {part: nested}
        out = merge(out, nested)
    return out


def eval_scale_override(values, origin="--eval-scale"):
    """`--eval-scale W H` (or `full`) -> {'evaluation': {'scale': [W, H] or None}}; None for no values."""
    if values is None:
        return None
    values = [str(v) for v in values]
    if len(values) == 1 and values[0].lower() in ("full", "native", "none"):
        return {"evaluation": {"scale": None}}
    try:
        width, height = (int(v) for v in values)
        if width < 1 or height < 1:
            raise ValueError
    except ValueError:
        raise ConfetiError(f"{origin} takes a width and a height in pixels (e.g. 1280 640) or 'full', "
                           f"got {' '.join(values)!r}") from None
    return {"evaluation": {"scale": [width, height]}}


def _validate_runtime(runtime, origin):
    if not isinstance(runtime, dict):
        raise ConfetiError(f"{origin}: 'runtime' must be a dict, got {runtime!r}")
    for key, value in runtime.items():
        if key not in RUNTIME_CHOICES:
            near = difflib.get_close_matches(str(key), list(RUNTIME_CHOICES), n=1, cutoff=0.6)
            hint = f"did you mean 'runtime.{near[0]}'?" if near else f"valid keys: {', '.join(RUNTIME_CHOICES)}"
            raise ConfetiError(f"{origin}: unknown key 'runtime.{key}' ({hint})")
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
