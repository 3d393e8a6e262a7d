"""The tree used in place, as on a bare GPU machine: a copy of the working tree (tracked files
and untracked ones git does not ignore, which is what reaches that machine: no build outputs,
no install) with PYTHONPATH=<copy> only; and the fused-op switch when a fused module is broken."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from confeti_fast import ops
from confeti_fast import reference

REPO = Path(__file__).resolve().parents[1]
# The interpreter keeps its site-packages (torch, triton, pytest); the finder of an editable
# install is dropped, so that nothing can resolve into this checkout.
NO_EDITABLE = ("import sys\n"
               "sys.meta_path[:] = [f for f in sys.meta_path\n"
               "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n")


@pytest.fixture(scope="module")
def bare_tree(tmp_path_factory):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout to list the tree's files")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    tree = tmp_path_factory.mktemp("bare") / "repo"
    for name in filter(None, map(os.fsdecode, listed)):
        source = REPO / name
        if source.is_file():  # not deleted in the working tree
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    assert not list(tree.rglob("*.so")), "build outputs must not travel"
    return tree


def _python(tree, code, cwd):
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", NO_EDITABLE + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_fused_modules_import_from_the_copy(bare_tree, tmp_path):
    code = (
        "import json\n"
        "import torch\n"
        "import confeti_fast, confeti_fast.configs, confeti_fast.kernels\n"
        "from confeti_fast.kernels import contrast, patch_nce, proto_update\n"
        "from confeti_fast import ops\n"
        "from confeti_fast.config import load_config\n"
        "load_config('demo')\n"
        "protos, counts = torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64)\n"
        "feats, labels = torch.randn(1, 4, 2, 2), torch.randint(0, 3, (1, 4, 4))\n"
        "ops.proto_ema_update(protos, counts, feats, None, labels, top_k=2)\n"
        "mods = (confeti_fast, confeti_fast.configs, confeti_fast.kernels, contrast, patch_nce, proto_update)\n"
        "print(json.dumps({'files': [m.__file__ for m in mods], 'ext': proto_update.AVAILABLE,\n"
        "                  'ext_error': proto_update.LOAD_ERROR, 'counts': int(counts.sum())}))\n")
    done = _python(bare_tree, code, cwd=tmp_path)  # the current directory is outside any checkout
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for path in result["files"]:
        assert Path(path).resolve().is_relative_to(bare_tree.resolve()), path
    # No build in the copy: the extension is missing, and the op falls back with a warning.
    assert result["ext"] is False and result["ext_error"]
    assert result["counts"] > 0
    assert "no fused proto_ema_update for cpu" in done.stderr


def test_everything_collects_in_the_copy(bare_tree):
    code = ("import pytest\n"
            "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests', 'benchmarks']))\n")
    done = _python(bare_tree, code, cwd=bare_tree)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "error" not in output.splitlines()[-1].lower(), output[-3000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert any(line.startswith("benchmarks/test_ops.py::") for line in collected)
    assert any(line.startswith("tests/test_in_place.py::") for line in collected)


# ---------------------------------------------------------------- a broken fused module

class _Broken:
    """A meta path finder under which importing `name` raises `error` (a broken kernel file)."""

    def __init__(self, name, error):
        self.name, self.error = name, error

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise self.error
        return None


@pytest.mark.parametrize("op,module,error", [
    ("pixel_proto_contrast", "contrast", None),  # missing: ModuleNotFoundError
    ("patch_nce", "patch_nce", SyntaxError("invalid syntax (patch_nce.py, line 1)")),
    ("proto_ema_update", "proto_update", RuntimeError("a broken extension\nsecond line")),
])
def test_a_fused_module_that_fails_to_import_gives_the_reference(monkeypatch, capsys, op, module, error):
    import confeti_fast.kernels as kernels_package

    name = f"confeti_fast.kernels.{module}"
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(kernels_package, module, raising=False)
    if error is None:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError
    else:
        monkeypatch.setattr(sys, "meta_path", [_Broken(name, error)] + sys.meta_path)
    monkeypatch.setattr(ops.switch, "_warned", set())
    with ops.kernels("fused"):
        for device in ("cuda", "cpu") if op == "proto_ema_update" else ("cuda",):
            function, missing = ops._fused(op, device)
            assert function is None and "importing it failed" in missing
            assert ops.implementation(op, device) is getattr(reference, op)
            assert ops.implementation(op, device) is getattr(reference, op)  # warned once
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(lines) == (2 if op == "proto_ema_update" else 1)
    assert all(f"no fused {op}" in line and "using the reference op" in line for line in lines)
    # and the op itself runs (on the CPU: the reference on the cuda path is device-agnostic)
    if op == "patch_nce":
        q = [torch.nn.functional.normalize(torch.randn(8, 4), dim=1)]
        assert torch.isfinite(ops.implementation(op, "cuda")(q, q, 2))
