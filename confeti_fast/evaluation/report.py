"""What an evaluation prints: the protocol in words and the per-class table (percentages)."""
import math

from .inference import resolve_mode
from .metrics import eval_class_sets, metric_names


def _pct(value):
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def describe_protocol(cfg, mode=None, weights=None):
    """The evaluation protocol in words, e.g. 'whole image at full resolution, student,
    mIoU over 19 classes': mode, scale, the evaluated weights (when given) and the classes."""
    ev = cfg["evaluation"]
    mode = resolve_mode(cfg, mode)
    scale = ev.get("scale")
    at = "full resolution" if scale is None else f"{int(scale[0])}x{int(scale[1])} (keep ratio)"
    if mode == "slide":
        (ch, cw), (sh, sw) = ev["slide_crop"], ev["slide_stride"]
        how = f"sliding {ch}x{cw} windows (stride {sh}x{sw}) at {at}"
    else:
        how = f"whole image at {at}"
    sets = eval_class_sets(cfg["eval_classes"], int(cfg["num_classes"]))
    classes = ", ".join(f"{name} over {len(members)} classes" for name, members in sets.items())
    return ", ".join([how] + ([weights] if weights else []) + [classes])


def format_table(result):
    """A text table: class, IoU %, Acc % (classes not evaluated: '-'; undefined: 'n/a'),
    then the mean(s) and aAcc; first the protocol line when `result` has 'protocol'."""
    names = result["class_names"]
    evaluated = set(result["classes"])
    width = max(12, max(len(n) for n in names))
    rule = "-" * (width + 18)
    lines = [f"protocol: {result['protocol']}"] if result.get("protocol") else []
    lines += [f"{'class':<{width}} {'IoU':>8} {'Acc':>8}", rule]
    for i, name in enumerate(names):
        if i in evaluated:
            lines.append(f"{name:<{width}} {_pct(result['IoU'][i]):>8} {_pct(result['Acc'][i]):>8}")
        else:
            lines.append(f"{name:<{width}} {'-':>8} {'-':>8}")
    lines.append(rule)
    metrics = metric_names(result)
    lines.append("  ".join(f"{m}: {_pct(result[m])}" for m in metrics + ["aAcc"]))
    if "num_images" in result:
        lines[-1] += f"  ({result['num_images']} images)"
    return "\n".join(lines)
