"""The config schema: every key is checked, at any depth, and the resolved config's top level.

The schema is the merged chain of presets under a file (the root preset `gta2cs` for a file
without a preset below it, such as a resolved `config.py`). A key the schema lacks is a
one-line error naming its full dotted path and the nearest valid key; a value of another type
than the schema's is one too (an int stands for a float, a tuple for a list; None is accepted
where the schema holds None or documents the key as optional, `OPTIONAL_VALUES`).
"""
import difflib

from ..errors import ConfetiError
from .presets import read_raw

# The preset every chain ends in: the schema of a file with no preset below it.
ROOT_PRESET = "gta2cs"
# Keys documented as optional: None, or a value of this type.
OPTIONAL_VALUES = {
    "model.pretrained": str,  # None: no ImageNet init
    "source.generate": str,  # None: the data is read from root as it is
    "target.generate": str,
    "evaluation.scale": list,  # None: inference at the image's full resolution
}

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
OPTIONAL_KEYS = {"runtime": dict, "data": dict}  # "data": absent from configs written before it
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
# `cut.generator`: CUT's ResNet generator, or the same network as a residual around its input
# (models/cut.py, build_cut).
CUT_GENERATORS = ("resnet", "residual")
# `evaluation.mode`: whole-image or sliding-window inference (evaluation/inference.py).
EVAL_MODES = ("whole", "slide")


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


def build_schema(preset_layers):
    """{key: {'kinds': set of types, 'children': {...}}} of the root preset and `preset_layers`
    (the presets of a chain, top first) merged."""
    root, _, _ = read_raw(ROOT_PRESET)
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
    _validate_cut(cfg["cut"], origin)
    if cfg["model"].get("depth") not in (18, 34, 50, 101):
        raise ConfetiError(f"{origin}: model.depth must be 18, 34, 50 or 101, got {cfg['model'].get('depth')!r}")


def _validate_cut(cut, origin):
    """The style transfer's choices that are not CUT's (docs/choices.md, "The demo's style transfer")."""
    if cut.get("generator", "resnet") not in CUT_GENERATORS:
        raise ConfetiError(f"{origin}: cut.generator must be one of {CUT_GENERATORS}, got {cut.get('generator')!r}")
    if cut.get("d_layers", 3) not in (1, 2, 3):
        raise ConfetiError(f"{origin}: cut.d_layers must be 1, 2 or 3 (CUT: 3), got {cut.get('d_layers')!r}")
    if cut.get("stage0_source_crops", "rcs") not in ("rcs", "plain"):
        raise ConfetiError(f"{origin}: cut.stage0_source_crops must be 'rcs' or 'plain', "
                           f"got {cut.get('stage0_source_crops')!r}")
    for key in ("d_ignore_bottom", "identity_l1_weight"):
        if cut.get(key, 0) < 0:
            raise ConfetiError(f"{origin}: cut.{key} must be >= 0, got {cut.get(key)!r}")
