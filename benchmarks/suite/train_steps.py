"""Steps train_stage0/1/2: a Trainer at paper shapes on a synthetic batch, compiled (with dynamo's
counts around each step), under the sync-debug mode, then the fast and the reference step timed."""
import statistics
import tempfile
import time
from pathlib import Path

from .budgets import TRAIN_ROUNDS, budget
from .dynamo_counts import dynamo_delta, dynamo_snapshot


def step_train(ctx, stage):
    """The training step of `stage`: its data and work dirs live in a temporary folder, removed after."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_suite_stage{stage}.") as data:
        _step_train(ctx, stage, Path(data))


def _step_train(ctx, stage, data):
    import gc

    import torch

    import train_cases as tc
    from confeti_fast import ops
    from timing import sync, time_ms

    try:
        torch._dynamo.utils.set_compilation_metrics_limit(100_000)
    except Exception:
        pass
    device = ctx.device
    size = "tiny" if ctx.dry else "paper"
    # dry run: the CUDA defaults but CUDA graphs (compile "default"; aot_eager, see step_process.dry_run_compile)
    runtime = ({"amp": "bf16", "channels_last": True, "compile": "default", "fused_optimizer": True,
                "check_finite": "log"} if ctx.dry else None)
    cfg = tc.config(size, data / "data")
    batch = tc.synthetic_batch(cfg, stage, torch.Generator().manual_seed(0))
    crop = cfg["stages"][str(stage)]["crop_size"]
    common = {"stage": stage, "size": size, "crop": crop, "depth": cfg["model"]["depth"],
              "cut_channels": cfg["cut"]["ngf"]}
    if ctx.dry:
        common["substituted"] = ("CPU, tiny config, the CUDA runtime defaults but compile 'default' (no CUDA "
                                 "graphs) with the aot_eager backend")
    state = {}

    def step():
        losses = state["trainer"].step(batch, tc.STEP_T)
        sync(device)
        return losses

    def compile_check():
        t0 = time.time()
        with ops.kernels("fused"):
            trainer = state["trainer"] = tc.make_trainer(cfg, stage, data / "fast", device, "fast", runtime)
        result = {"runtime": trainer.runtime, "build_s": round(time.time() - t0, 1),
                  "fused": {n: getattr(ops.implementation(n, device), "__module__", "?") for n in ops.OP_NAMES}}
        s0 = dynamo_snapshot()
        t0 = time.time()
        losses = step()
        result["first_step_s"] = round(time.time() - t0, 1)
        s1 = dynamo_snapshot()
        result["dynamo_first_step"] = dynamo_delta(s0, s1)
        result["losses"] = {k: round(float(v), 5) for k, v in losses.items()}
        result["losses_finite"] = all(torch.isfinite(torch.as_tensor(v)).item() for v in result["losses"].values())
        t0 = time.time()
        evaluation = trainer.evaluate()
        sync(device)
        result["eval_s"] = round(time.time() - t0, 1)
        result["eval"] = ({k: evaluation[k] for k in ("mIoU", "num_images", "mode") if k in evaluation}
                          or "none (stage 0)")
        s2 = dynamo_snapshot()
        result["dynamo_eval"] = dynamo_delta(s1, s2)
        t0 = time.time()
        step()
        result["second_step_s"] = round(time.time() - t0, 1)
        s3 = dynamo_snapshot()
        result["dynamo_second_step"] = dynamo_delta(s2, s3)
        result["second_step_compiled"] = bool(result["dynamo_second_step"].get("frames") or
                                              result["dynamo_second_step"].get("graphs"))
        result["dynamo_total"] = dynamo_delta({}, s3)
        if device == "cuda":
            result["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return result

    ctx.sub("compile", 0, compile_check, **common)
    if "trainer" not in state:
        return

    def sync_check():
        step()  # one more plain step first (CUDA-graph trees record on their second run)
        if ctx.dry:
            step()
            return {"substituted": "no CUDA: the step ran without torch.cuda.set_sync_debug_mode('error')"}
        sync(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            state["trainer"].step(batch, tc.STEP_T)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sync(device)
        return {"sync_debug_mode": "error", "host_syncs": 0}

    ctx.sub("sync", budget("sync", ctx.dry), sync_check, **common)
    if stage == 0:
        return
    timed, warmup = TRAIN_ROUNDS[ctx.dry]
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"

    def time_steps(trainer):
        for _ in range(warmup):
            trainer.step(batch, tc.STEP_T)
        sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_ms(lambda: trainer.step(batch, tc.STEP_T), timed, device)
        result = {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2), "rounds": timed,
                  "device_name": device_name, "runtime": trainer.runtime}
        if device == "cuda":
            result["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return result

    def bench_fast():
        with ops.kernels("fused"):
            result = time_steps(state["trainer"])
        state["fast"] = result
        return dict(result, variant="fast", kernels="fused")

    ctx.sub("bench_fast", budget("bench_fast", ctx.dry), bench_fast, **common)
    state.pop("trainer", None)
    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()

    def bench_reference():
        with ops.kernels("reference"):
            trainer = tc.make_trainer(cfg, stage, data / "reference", device, "reference")
            trainer.step(batch, tc.STEP_T)
            result = time_steps(trainer)
            result["step_tflop"] = round(tc.step_flops(trainer, batch) / 1e12, 4)
        if "fast" in state:
            result.update(tc.speedup_info(state["fast"]["median_ms"], state["fast"], result["median_ms"], result))
            result["fast_median_ms"] = state["fast"]["median_ms"]
        return dict(result, variant="reference", kernels="reference")

    ctx.sub("bench_reference", budget("bench_reference", ctx.dry), bench_reference, **common)
