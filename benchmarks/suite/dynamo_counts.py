"""Dynamo's counts at one point of a run, and what happened between two such points.

Robust from torch 2.11 to 2.14: `torch._dynamo.utils.counters` ("frames"/"ok": frames dynamo
converted; "stats"/"unique_graphs": FX graphs compiled; "graph_break": breaks by reason;
"inductor"/"cudagraph_skips": graphs that fell back from CUDA graphs), and
`torch._dynamo.utils.get_compilation_metrics()` (one entry per frame compile): a recompile is an
entry whose `recompile_reason` is set, or, where that field is missing, whose compile id
"frame/n" has n > 0.
"""


def dynamo_snapshot():
    import torch

    from torch._dynamo.utils import counters

    snap = {"frames": counters["frames"]["ok"], "frames_total": counters["frames"]["total"],
            "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    try:
        metrics = torch._dynamo.utils.get_compilation_metrics()
    except Exception:
        metrics = None
    if metrics is not None:
        frames = [m for m in metrics if getattr(m, "co_name", None)]  # entries without a frame: backward graphs
        has_reason = bool(frames) and hasattr(frames[0], "recompile_reason")
        reasons = []
        for m in frames:
            compile_id = str(getattr(m, "compile_id", "") or "")
            if has_reason:
                again = bool(m.recompile_reason)
            else:
                try:
                    again = int(compile_id.strip("[]!").split("/")[1].split("_")[0]) > 0
                except (IndexError, ValueError):
                    again = False
            if again:
                reason = " ".join(str(getattr(m, "recompile_reason", None) or "(no reason recorded)").split())
                reasons.append(f"{m.co_name} {compile_id}: {reason}"[:300])
        snap["compiles"] = len(frames)
        snap["recompiles"] = len(reasons)
        snap["_reasons"] = reasons
    snap["_breaks"] = dict(list(counters["graph_break"].items())[:10])
    return snap


def dynamo_delta(before, after):
    delta = {k: after[k] - before.get(k, 0) for k in after if not k.startswith("_") and isinstance(after[k], int)}
    if "_reasons" in after:
        delta["recompile_reasons"] = after["_reasons"][len(before.get("_reasons", [])):][:10]
    if after.get("_breaks"):
        delta["graph_break_reasons"] = {k[:200]: v for k, v in after["_breaks"].items()}
    return delta
