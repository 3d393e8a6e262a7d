"""The package's modules import one another without circles.

The graph is read from the source (every import statement, deferred ones inside functions
included: a deferred import hides a circle, it does not remove it). `kernels/` and `configs/`
are the installed `confeti_fast.kernels` and `confeti_fast.configs`. Importing `a.b.c` from
outside package `a.b` also runs `a/__init__` and `a/b/__init__`, so those are edges too.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"confeti_fast": REPO / "confeti_fast", "confeti_fast.kernels": REPO / "kernels",
         "confeti_fast.configs": REPO / "configs"}


def package_modules():
    """{module name: (path, is_package)} for every module of the package."""
    modules = {}
    for prefix, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = (path, is_package)
    return modules


def _ancestors(name):
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules):
    """{module: set of package modules it imports}."""
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # submodules, if they are
        edges = set()
        for target in targets:
            if target not in modules:
                continue
            edges.add(target)
            own = set(_ancestors(name)) | ({name} if is_package else set())
            edges.update(a for a in _ancestors(target) if a in modules and a not in own)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One import circle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("deferred", [False, True])
def test_the_walk_finds_a_planted_circle(tmp_path, monkeypatch, deferred):
    """The check itself: a two-module circle, with one side's import deferred into a function."""
    pkg = tmp_path / "confeti_fast"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    body = "def f():\n    from .. import a\n" if deferred else "from confeti_fast import a\n"
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(body)
    monkeypatch.setitem(ROOTS, "confeti_fast", pkg)
    monkeypatch.delitem(ROOTS, "confeti_fast.kernels")
    monkeypatch.delitem(ROOTS, "confeti_fast.configs")
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is not None and {"confeti_fast.a", "confeti_fast.sub.b"} <= set(cycle)


def test_a_package_init_importing_a_child_that_imports_its_parent_is_a_circle(tmp_path, monkeypatch):
    pkg = tmp_path / "confeti_fast"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("def choose():\n    pass\nfrom . import child\n")
    (pkg / "ops" / "child.py").write_text("from . import choose\n")
    monkeypatch.setitem(globals(), "ROOTS", {"confeti_fast": pkg})
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is not None and "confeti_fast.ops.child" in cycle


def test_setup_py_installs_every_package():
    """A subpackage missing from setup.py's explicit list works in a checkout and is absent
    from a non-editable install."""
    listed = set(ast.literal_eval(next(
        node.value for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
        if isinstance(node, ast.keyword) and node.arg == "packages")))
    packages = {name for name, (_, is_package) in package_modules().items() if is_package}
    assert packages - listed == set()
