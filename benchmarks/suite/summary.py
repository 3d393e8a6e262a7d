"""summary.txt: the steps' outcomes, then the ops, ceilings, training steps and failures, from the records."""


def _ms(value):
    return "-" if value is None else f"{value:.3f}"


def summary_text(records, status):
    lines = [f"gpu_suite summary ({'DRY RUN, CPU stand-ins' if any(r.get('dry_run') for r in records) else 'GPU'})", ""]
    lines.append("steps:")
    for part, step, state, seconds, note in status:
        lines.append(f"  {part:8s} {step:14s} {state:8s} {seconds:7.1f} s  {note}")
    env = next((r for r in records if r.get("step") == "env" and r.get("sub") == "env"), None)
    if env:
        lines += ["", f"env: {env.get('device_name')} | torch {env.get('torch')} | triton {env.get('triton')} | "
                      f"cuda {env.get('cuda')} | "
                      + (f"commit {env['commit']}" if env.get("commit") else f"tree digest {env.get('tree_digest')}")]
    ops = {}
    for r in records:
        if r.get("step") in ("ops", "ops_compiled") and r.get("status") == "ok" and r.get("impl"):
            ops.setdefault(r["op"], {})[r["impl"]] = r
    graphs = {(r.get("op"), r.get("impl")): r for r in records if r.get("step") == "graphs" and r.get("status") == "ok"}
    if ops:
        lines += ["", "ops (median wall ms; replay = CUDA-graph replay, ~kernel time):",
                  f"  {'op':13s} {'reference':>10s} {'compiled':>10s} {'fused':>10s} {'x eager':>8s} "
                  f"{'x compiled':>10s}"
                  f" {'launches':>8s} {'replay':>8s} {'peak MB':>8s}"]
        for op, impls in ops.items():
            ref, comp, fused = (impls.get(k, {}).get("median_ms") for k in ("reference", "compiled", "fused"))
            vs_eager = f"{ref / fused:.2f}" if ref and fused else "-"
            vs_comp = f"{comp / fused:.2f}" if comp and fused else "-"
            launches = impls.get("fused", {}).get("launches", {}).get("total", "-")
            replay = graphs.get((op, "fused"), {}).get("replay_ms")
            peak = impls.get("fused", {}).get("peak_extra_mb")
            lines.append(f"  {op:13s} {_ms(ref):>10s} {_ms(comp):>10s} {_ms(fused):>10s} {vs_eager:>8s} {vs_comp:>10s}"
                         f" {launches!s:>8s} {_ms(replay):>8s} {_ms(peak):>8s}")
    for r in records:
        if r.get("step") == "ceilings" and r.get("status") == "ok" and r.get("sub") != "step":
            lines.append(f"ceiling {r.get('sub')}: {r.get('value')} {r.get('unit')} ({r.get('what')})")
        if r.get("step", "").startswith("train_") and r.get("sub") not in (None, "step"):
            bits = [f"{r['step']} {r['sub']}: {r.get('status')}"]
            for key in ("seconds", "first_step_s", "second_step_s", "median_ms", "speedup_vs_reference", "mfu_bf16",
                        "second_step_compiled", "error"):
                if key in r:
                    bits.append(f"{key} {r[key]}")
            if "dynamo_first_step" in r:
                d = r["dynamo_first_step"]
                bits.append(f"first step: {d.get('graphs')} graphs, {d.get('recompiles')} recompiles")
            lines.append("  ".join(str(b) for b in bits))
        if r.get("step") == "tests" and r.get("sub") == "pytest":
            lines.append(f"tests: {r.get('passed')} passed, {r.get('failed')} failed, {r.get('skipped')} skipped"
                         + (f"; failing: {r.get('failing')}" if r.get("failing") else ""))
    failures = [f"{r.get('step')}/{r.get('sub')}: {r.get('error') or r.get('reason') or r.get('status')}"
                for r in records if r.get("status") in ("failed", "timeout", "killed")]
    lines += ["", "failures:" if failures else "no failures"] + [f"  {f}" for f in failures]
    return "\n".join(lines) + "\n"
