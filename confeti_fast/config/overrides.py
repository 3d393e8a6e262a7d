"""Overrides: merging config dicts, `--cfg-options key.path=value` items and `--eval-scale`."""
import ast
import copy

from ..errors import ConfetiError


def merge(base, override):
    """Recursively merge `override` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


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
