"""Loading weights: the ImageNet backbone init, and strict loading for evaluation/resume.

`load_imagenet_backbone` reads an OpenMMLab `resnetXX_v1c` ImageNet checkpoint from a local
file and returns a `BackboneLoadReport` listing every missing and unexpected key (the caller
prints it; nothing is dropped silently). `load_model_weights` loads a full state dict strictly
and explains, in one line, why a checkpoint does not fit the model.

Every user-facing problem raises `ConfetiError` with one line that names the file.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..serialization import read_checkpoint
from ..errors import ConfetiError
from .resnet import ARCH_SETTINGS

_V1C_HINT = "a ResNetV1c one is needed, e.g. mmcv's open-mmlab://resnet{depth}_v1c"
# OpenMMLab's model zoo (mmcv's open-mmlab://resnet<depth>_v1c names resolve to these files).
V1C_URLS = {
    18: "https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth",
    50: "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    101: "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}
_MAX_LISTED = 3


def _one_line(text, limit=300):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape(t):
    return tuple(t.shape)


def _examples(keys, n=_MAX_LISTED):
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass
class BackboneLoadReport:
    """What `load_imagenet_backbone` did. `str(report)` is a readable multi-line summary."""

    path: str
    depth: int
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)

    @property
    def complete(self):
        """True when every backbone weight came from the file and nothing was left over."""
        return not self.missing and not self.unexpected

    def as_dict(self):
        return {"path": self.path, "depth": self.depth, "loaded": list(self.loaded),
                "missing": list(self.missing), "unexpected": list(self.unexpected)}

    def __str__(self):
        lines = [f"ImageNet init from {self.path}: ResNetV1c-{self.depth}, "
                 f"{len(self.loaded)} tensors loaded"]
        lines += _describe_keys("missing in the checkpoint (left at their init)", self.missing)
        lines += _describe_keys("unexpected in the checkpoint (not used)", self.unexpected)
        if self.complete:
            lines.append("  all backbone keys matched")
        return "\n".join(lines)


def _describe_keys(title, keys):
    if not keys:
        return []
    # BN step counters carry no weights; group them so the real problems stay readable.
    counters = [k for k in keys if k.endswith("num_batches_tracked")]
    others = [k for k in keys if not k.endswith("num_batches_tracked")]
    lines = [f"  {len(keys)} key(s) {title}:"]
    groups = {}
    for k in others:
        groups.setdefault(k.split(".")[0], []).append(k)
    for prefix, group in groups.items():
        if len(group) <= 8:
            lines += [f"    {k}" for k in group]
        else:
            lines.append(f"    {prefix}.*: {len(group)} keys, e.g. {_examples(group)}")
    if counters:
        lines.append(f"    {len(counters)} BatchNorm num_batches_tracked counter(s)")
    return lines


def _strip_prefix(state_dict, prefix):
    if any(k.startswith(prefix) for k in state_dict):
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    return state_dict


def extract_state_dict(obj, where):
    """The tensor state dict in `obj` (itself, or under 'state_dict'); `where` names it in errors."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ConfetiError(f"{where} does not hold a state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ConfetiError(
            f"{where} is not a plain state dict: entries {_examples(map(str, bad))} are not tensors")
    return dict(obj)


def _blocks_per_stage(keys):
    counts = []
    for stage in range(1, 5):
        idx = {int(k.split(".")[1]) for k in keys
               if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        counts.append(max(idx) + 1 if idx else 0)
    return tuple(counts)


def _guess_depth(keys):
    """(depth or None, description) of the ResNet the keys describe."""
    kind = "bottleneck" if any(k.startswith("layer1.0.conv3.") for k in keys) else "basic"
    counts = _blocks_per_stage(keys)
    for depth, (arch_kind, blocks) in ARCH_SETTINGS.items():
        if arch_kind == kind and blocks == counts:
            return depth, f"{kind} blocks {counts}"
    return None, f"{kind} blocks {counts}"


def missing_imagenet_hint(depth, path):
    """What a missing ImageNet file should be, where it comes from, and how to point a config at it."""
    url = V1C_URLS.get(depth)
    source = f"e.g. {url}" if url else f"its resnet{depth}_v1c file"
    return (f"the backbone init expects OpenMMLab's ImageNet ResNetV1c-{depth} (mmcv's "
            f"open-mmlab://resnet{depth}_v1c) from the OpenMMLab model zoo ({source}); save it as {path}, "
            f"or point the config's model.pretrained key at your copy (--cfg-options model.pretrained=PATH; "
            f"None: random init)")


def load_imagenet_backbone(backbone, path):
    """Load an OpenMMLab `resnetXX_v1c` ImageNet checkpoint into a `ResNetV1c`.

    Accepts the state dict at top level or under 'state_dict', keys optionally prefixed with
    'backbone.' (or 'module.'). Returns a `BackboneLoadReport` with the missing and
    unexpected keys (e.g. the classifier `fc.*`); the caller prints it. Raises a one-line
    `ConfetiError` naming the file when the file is absent or unreadable, is not a
    ResNetV1c checkpoint, is a ResNetV1c of another depth, or a tensor's shape differs.
    """
    what = "ImageNet checkpoint"
    path = Path(path)
    depth = backbone.depth
    if not path.exists():
        raise ConfetiError(f"{what} {path} does not exist: " + missing_imagenet_hint(depth, path))
    sd = extract_state_dict(read_checkpoint(path, what), f"{what} {path}")
    sd = _strip_prefix(sd, "module.")
    sd = _strip_prefix(sd, "backbone.")
    if "stem.0.weight" not in sd:
        if "conv1.weight" in sd:
            guessed, _ = _guess_depth(sd)
            kind = f"a torchvision/ResNetV1b ResNet{'-' + str(guessed) if guessed else ''}"
            raise ConfetiError(
                f"{what} {path} looks like {kind} (it has conv1.weight, no stem.0.weight); "
                + _V1C_HINT.format(depth=depth))
        raise ConfetiError(
            f"{what} {path} is not a ResNetV1c checkpoint: it has no stem.0.weight "
            f"(first keys: {_examples(sd)}); " + _V1C_HINT.format(depth=depth))
    guessed, desc = _guess_depth(sd)
    if guessed != depth:
        looks = f"a ResNetV1c-{guessed}" if guessed else f"a ResNetV1c of unknown depth ({desc})"
        raise ConfetiError(
            f"{what} {path} looks like {looks} ({desc}) but model.depth is {depth}; "
            f"use open-mmlab://resnet{depth}_v1c or set model.depth to {guessed or 'match it'}")

    model_sd = backbone.state_dict()
    mismatched = [k for k in sd if k in model_sd and _shape(sd[k]) != _shape(model_sd[k])]
    if mismatched:
        k = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ConfetiError(
            f"{what} {path} does not fit ResNetV1c-{depth}: {k} is {_shape(sd[k])} in the checkpoint "
            f"but {_shape(model_sd[k])} in the model{more}")
    loaded = [k for k in model_sd if k in sd]
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    backbone.load_state_dict({k: sd[k] for k in loaded}, strict=False)
    return BackboneLoadReport(str(path), depth, loaded, missing, unexpected)


def _shape_hint(key, ckpt_shape, model_shape):
    if len(ckpt_shape) == len(model_shape) and ckpt_shape[1:] == model_shape[1:] and (
            "decode_head" in key or "aspp" in key or "cam" in key or "classifier" in key):
        return " (num_classes?)"
    if "layer" in key or "stem" in key or "backbone" in key:
        return " (model.depth?)"
    return ""


def load_model_weights(module, state_dict, what):
    """Strictly load `state_dict` into `module`; explain any misfit in one ConfetiError line.

    `what` names the checkpoint in the message (e.g. its path). Keys saved from a
    `torch.compile`d or DDP-wrapped module (`_orig_mod.`, `module.` prefixes) are accepted.
    """
    target = getattr(module, "_orig_mod", module)
    if not isinstance(state_dict, dict):
        raise ConfetiError(f"checkpoint {what} does not hold a state dict here (found {type(state_dict).__name__})")
    sd = {str(k).replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    model_sd = target.state_dict()
    if not any(k in model_sd for k in sd):
        sd = _strip_prefix(sd, "module.")
    not_tensors = [k for k, v in sd.items() if not torch.is_tensor(v)]
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [k for k in sd if k in model_sd and torch.is_tensor(sd[k])
                  and _shape(sd[k]) != _shape(model_sd[k])]
    problems, hints = [], set()
    for k in mismatched[:_MAX_LISTED]:
        hint = _shape_hint(k, _shape(sd[k]), _shape(model_sd[k]))
        problems.append(f"{k} is {_shape(sd[k])} in the checkpoint but {_shape(model_sd[k])} in the model"
                        + ("" if hint in hints else hint))
        hints.add(hint)
    if len(mismatched) > _MAX_LISTED:
        problems.append(f"{len(mismatched) - _MAX_LISTED} more shape mismatches")
    if missing:
        problems.append(f"{_plural(len(missing), 'missing key')} (e.g. {_examples(missing)})")
    if unexpected:
        problems.append(f"{_plural(len(unexpected), 'unexpected key')} (e.g. {_examples(unexpected)})")
    if not_tensors:
        problems.append(f"{len(not_tensors)} non-tensor entries (e.g. {_examples(not_tensors)})")
    if problems:
        hint = ""
        if not mismatched and any(k.startswith(("layer", "backbone.layer")) for k in missing + unexpected):
            hint = " (model.depth?)"
        raise ConfetiError(f"checkpoint {what} does not fit the config: " + "; ".join(problems) + hint)
    target.load_state_dict(sd, strict=True)
    return module
