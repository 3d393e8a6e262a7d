"""Steps env, extension and tests: what the card and the install are, that the extension imports
(built in place when it does not), and the op test files under pytest."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import ROOT
from .records import last_line, write_atomic

TEST_FILES = ("tests/test_op_contrast.py", "tests/test_op_patch_nce.py", "tests/test_op_proto_update.py")


def tree_digest(root=ROOT):
    """sha1 over the sources (path and bytes of every .py/.cpp/.cu/.h/.sh under the package,
    kernels/, csrc/, configs/, benchmarks/, tests/, setup.py): identifies a tree without .git."""
    import hashlib

    digest = hashlib.sha1()
    root = Path(root)
    files = [root / "setup.py"]
    for folder in ("confeti_fast", "kernels", "csrc", "configs", "benchmarks", "tests"):
        files += [p for p in (root / folder).rglob("*") if p.suffix in (".py", ".cpp", ".cu", ".h", ".cuh", ".sh")
                  and "__pycache__" not in p.parts]
    for path in sorted(p for p in files if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def step_env(ctx):
    import importlib
    import platform

    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "root": str(ROOT),
            "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_HOME", "CUDA_VISIBLE_DEVICES",
                                                    "TORCH_CUDA_ARCH_LIST", "PYTHONPATH", "CONFETI_KERNELS")}}
    for name in ("triton", "numpy", "pytest", "pytest_benchmark", "PIL", "cv2", "tqdm", "setuptools", "ninja"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as exc:
            info[name] = f"MISSING ({type(exc).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    device_count=torch.cuda.device_count())
        try:
            version = torch._C._cuda_getDriverVersion()
            info["driver_cuda_version"] = f"{version // 1000}.{version % 1000 // 10}"
        except Exception:
            pass
    else:
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    for key, command in (("driver", ["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm,power.limit",
                                     "--format=csv,noheader"]),
                         ("nvcc", ["nvcc", "--version"]), ("commit", ["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
                         ("git_status", ["git", "-C", str(ROOT), "status", "--porcelain"])):
        if key in ("commit", "git_status") and not (ROOT / ".git").exists():
            info[key] = None  # a copy of the tree without .git (git would find an enclosing repository)
            continue
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=20)
            text = done.stdout.rstrip() if done.returncode == 0 else None
            info[key] = (text.splitlines()[-1] if key == "nvcc" and text else
                         (text.splitlines()[:20] if key == "git_status" and text is not None else text))
        except Exception:
            info[key] = None
    info["tree_digest"] = tree_digest()
    try:
        from confeti_fast.kernels import contrast, patch_nce, proto_update

        info["fused"] = {"triton": contrast.AVAILABLE and patch_nce.AVAILABLE,
                         "triton_error": contrast.LOAD_ERROR or patch_nce.LOAD_ERROR,
                         "ext_cpu": proto_update.AVAILABLE, "ext_cpu_error": proto_update.LOAD_ERROR,
                         "ext_cuda": proto_update.CUDA_AVAILABLE, "ext_cuda_error": proto_update.CUDA_LOAD_ERROR}
    except Exception as exc:
        info["fused"] = {"error": last_line(exc)}
    write_atomic(ctx.out / "env.json", (json.dumps(info, indent=1, default=str) + "\n").encode())
    short = {k: info.get(k) for k in ("device_name", "capability", "memory_gib", "torch", "triton", "cuda", "cudnn",
                                      "driver", "numpy", "pytest", "commit", "tree_digest", "fused", "cv2", "tqdm")}
    ctx.rec.write(sub="env", status="ok", **short)


def _extension_state(need_cuda):
    code = ("import json, sys\nfrom confeti_fast.kernels import proto_update as p\n"
            "files = {n: getattr(sys.modules.get('confeti_fast.' + n), '__file__', None) for n in ('_C', '_C_cuda')}\n"
            "print(json.dumps({'cpu': p.AVAILABLE, 'cuda': p.CUDA_AVAILABLE, 'cpu_error': p.LOAD_ERROR, "
            "'cuda_error': p.CUDA_LOAD_ERROR, 'files': files}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    try:
        state = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        state = {"cpu": False, "cuda": False, "cpu_error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    # built in this tree (not an installed copy elsewhere that happens to import)
    files = state.get("files") or {}
    here = all(str(files[n]).startswith(str(ROOT)) for n in (("_C", "_C_cuda") if need_cuda else ("_C",))
               if files.get(n))
    state["ready"] = bool(state["cpu"] and (state["cuda"] or not need_cuda) and here)
    return state


def step_extension(ctx):
    need_cuda = not ctx.dry
    before = _extension_state(need_cuda)
    if before["ready"]:
        ctx.rec.write(sub="extension", status="ok", built=False, state=before, note="imports in place: not rebuilt")
        return
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    if need_cuda:
        env.update(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    else:
        env.pop("FORCE_CUDA", None)
    log = ctx.logs / "build_ext.log"
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], stdout=f,
                                stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, timeout=max(10, ctx.remaining() - 10)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    after = _extension_state(need_cuda)
    ctx.rec.write(sub="extension", status="ok" if after["ready"] else "failed", built=True, rc=rc,
                  seconds=round(time.time() - t0, 1), cuda_build=need_cuda, state=after,
                  log_tail=log.read_text(errors="replace").splitlines()[-5:])


def step_tests(ctx):
    import xml.etree.ElementTree as ET

    junit = ctx.logs / "tests.xml"
    command = [sys.executable, "-m", "pytest", *TEST_FILES, "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
    t0 = time.time()
    try:
        rc = subprocess.run(command, cwd=ROOT, timeout=max(10, ctx.remaining() - 5)).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    try:
        for case in ET.parse(junit).getroot().iter("testcase"):
            counts["tests"] += 1
            for kind, key in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
                node = case.find(kind)
                if node is not None:
                    counts[key] += 1
                    if kind != "skipped":
                        message = (node.get("message") or "").splitlines()
                        reason = message[0][:200] if message else ""
                        failing.append(f"{case.get('classname')}::{case.get('name')}: {reason}")
    except (OSError, ET.ParseError) as exc:
        failing.append(f"no junit XML: {last_line(exc)}")
    passed = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    ctx.rec.write(sub="pytest", status="ok" if rc == 0 else ("timeout" if rc == 124 else "failed"), rc=rc,
                  seconds=round(time.time() - t0, 1), passed=passed, failed=counts["failed"] + counts["errors"],
                  skipped=counts["skipped"], failing=failing[:50], files=list(TEST_FILES),
                  device="cpu (TRITON_INTERPRET=1; the bf16 / CUDA variants skip)" if ctx.dry else "cuda")
