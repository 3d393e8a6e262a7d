"""Steps ops and ops_compiled (each op's reference, compiled reference and fused op, timed), graphs
(one call captured in a CUDA graph and replayed) and ceilings (copy bandwidth, matmul rate)."""
import statistics

from .budgets import ROUNDS
from .records import last_line, read_records


def _op_setting(ctx):
    """(make_case keywords, note): on the GPU the paper's shapes in bf16 + channels_last under
    bf16 autocast, as a training step runs the ops."""
    import torch

    setting = dict(dtype=torch.bfloat16, channels_last=True, autocast=True)
    if ctx.dry:
        return dict(setting, size="tiny"), "tiny shapes on the CPU (Triton under TRITON_INTERPRET=1)"
    return dict(setting, size="paper"), None


def _fused(ctx, op):
    """(fn, note): the fused implementation the GPU runs; in a dry run the CUDA dispatch's
    implementation called on CPU tensors (Triton under the interpreter)."""
    import cases
    from confeti_fast import ops

    if not ctx.dry:
        return cases.implementation(op, ctx.device, "fused"), None
    name = cases.FUNCTION[op]
    fn, missing = ops._fused(name, "cuda")
    if fn is not None and fn is not getattr(cases.reference, name):
        return fn, "the CUDA dispatch's fused op on CPU tensors (Triton under TRITON_INTERPRET=1)"
    return cases.implementation(op, "cpu", "fused"), f"the CPU fused op (no CUDA fused op here: {missing})"


def _time_case(ctx, case, fn):
    import cases
    from confeti_fast.profiling import count_launches
    from timing import sync, time_ms

    timed, warmup = ROUNDS[ctx.dry]
    first_ms = time_ms(lambda: case.call(fn, *case.setup()), 1, ctx.device)[0]  # compilation, Triton JIT, lazy init
    for _ in range(warmup):
        case.call(fn, *case.setup())
    times = time_ms(lambda *args: case.call(fn, *args), timed, ctx.device, setup=case.setup)
    peak = cases.peak_extra_mb(case, fn)
    args = case.setup()
    sync(ctx.device)
    launches = count_launches(lambda: case.call(fn, *args))
    sync(ctx.device)
    return {"median_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4), "rounds": timed,
            "first_call_ms": round(first_ms, 1), "peak_extra_mb": round(peak, 3),
            "launches": {"total": launches.total, "triton": launches.triton, "torch_ops": launches.torch_ops,
                         "names": launches.names[:60]}}


def step_ops(ctx, compiled=False):
    import cases

    setting, note = _op_setting(ctx)
    medians = {}
    for r in read_records(ctx.out, ctx.rec.common["run"]):
        if r.get("step") == "ops" and r.get("status") == "ok" and r.get("impl"):
            medians[(r["op"], r["impl"])] = r["median_ms"]
    for op in cases.OPS:
        impls = ("compiled",) if compiled else ("reference", "fused")
        for impl in impls:
            case = cases.make_case(op, ctx.device, **setting)
            fields = dict(case.info(), impl=impl)
            if note:
                fields["substituted"] = note
            if compiled and op in cases.COMPILE_SKIPPED:
                ctx.rec.write(sub=f"{op}/{impl}", status="skipped", reason=cases.COMPILE_SKIPPED[op], **fields)
                continue

            def measure(op=op, impl=impl, case=case):
                if impl == "fused":
                    fn, why = _fused(ctx, op)
                else:
                    fn, why = cases.implementation(op, ctx.device, impl), None
                result = _time_case(ctx, case, fn)
                if why:
                    result["implementation"] = why
                if ctx.dry and impl == "compiled":
                    result["substituted"] = (note + "; " if note else "") + "torch.compile backend aot_eager"
                medians[(op, impl)] = result["median_ms"]
                ref, fused = medians.get((op, "reference")), medians.get((op, "fused"))
                if impl != "reference" and ref:
                    result["speedup_vs_reference"] = round(ref / result["median_ms"], 2)
                if impl == "compiled" and fused:
                    result["fused_speedup_vs_compiled"] = round(result["median_ms"] / fused, 2)
                return result

            ctx.sub(f"{op}/{impl}", 30 if compiled else 10, measure, **fields)


def step_graphs(ctx):
    import torch

    import cases
    from timing import sync, time_ms

    setting, note = _op_setting(ctx)
    timed = ROUNDS[ctx.dry][0]
    # The fused ops first; the references last: the contrast reference reads `kept.any()` back
    # to the host, which a capture forbids (recorded as unsupported), and a failed capture must
    # not disturb the others.
    plan = [("contrast", "fused"), ("patch_nce", "fused"), ("proto_update", "fused"), ("patch_nce", "reference"),
            ("contrast", "reference")]
    for op, impl in plan:
        case = cases.make_case(op, ctx.device, **setting)
        fields = dict(case.info(), impl=impl)

        def measure(op=op, impl=impl, case=case):
            fn = _fused(ctx, op)[0] if impl == "fused" else cases.implementation(op, ctx.device, impl)
            args = case.setup()
            for _ in range(3):
                case.call(fn, *args)
            sync(ctx.device)
            wall = time_ms(lambda: case.call(fn, *args), timed, ctx.device)
            result = {"wall_ms": round(statistics.median(wall), 4), "rounds": timed}
            if ctx.dry:
                replay = wall  # no CUDA graphs on the CPU: the eager call stands in for the replay
                result["substituted"] = ((note + "; " if note else "")
                                         + "no CUDA graph: the eager call timed as the replay")
            else:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        case.call(fn, *args)
                torch.cuda.current_stream().wait_stream(stream)
                sync(ctx.device)
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        case.call(fn, *args)
                    sync(ctx.device)
                except Exception as exc:
                    if impl == "fused":
                        raise
                    return dict(result, status="unsupported", error=last_line(exc),
                                reason="the reference does not capture (a host sync or a data-dependent shape)")
                graph.replay()
                replay = time_ms(graph.replay, timed, ctx.device)
                del graph
            result["replay_ms"] = round(statistics.median(replay), 4)
            result["host_ms"] = round(result["wall_ms"] - result["replay_ms"], 4)
            return result

        ctx.sub(f"{op}/{impl}", 5, measure, **fields)
    ctx.rec.write(sub="proto_update/reference", status="skipped", op="proto_update", impl="reference",
                  reason="the reference reads data-dependent sizes back to the host (nonzero, per-class top-k): "
                         "not capturable in a CUDA graph")


def step_ceilings(ctx):
    import torch

    from timing import time_ms

    device = ctx.device
    if ctx.dry:
        nbytes, n, dtype = 64 * 2**20, 512, torch.float32
    else:
        nbytes, n, dtype = 2**30, 8192, torch.bfloat16
    reps = 5 if ctx.dry else 20

    def timed(fn):
        """Seconds per call of `reps` calls back to back (one sync at the end: a throughput)."""
        fn()  # warm-up
        return time_ms(lambda: [fn() for _ in range(reps)], 1, device)[0] / 1e3 / reps

    def copy():
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        seconds = timed(lambda: dst.copy_(src))
        return {"value": round(2 * nbytes / seconds / 1e9, 1), "unit": "GB/s",
                "what": f"{nbytes / 2**20:.0f} MiB copy_, read + write bytes, {reps} reps"}

    def matmul():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = timed(lambda: torch.mm(a, b))
        return {"value": round(2 * n**3 / seconds / 1e12, 2), "unit": "TFLOP/s",
                "what": f"{n}^3 {str(dtype).replace('torch.', '')} matmul, {reps} reps"}

    note = {"substituted": "CPU: 64 MiB copy and a 512^3 fp32 matmul"} if ctx.dry else {}
    ctx.sub("copy_bandwidth", 5, copy, **note)
    ctx.sub("matmul_bf16", 5, matmul, **note)
