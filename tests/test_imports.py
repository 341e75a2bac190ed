"""The package's rooms: every module imports on its own, and no module imports another that
imports it back (function-level imports included, where a cycle would hide)."""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dino_jax"


def module_names() -> dict[str, pathlib.Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its file (a package's __init__ counts
    as imported with each of its submodules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way are imported too
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != name:
                    found.add(prefix)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_one_that_imports_it_back():
    modules = module_names()
    graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    # A package's __init__ is imported with its submodules, not the other way round.
    graph = {
        name: {t for t in targets if not name.startswith(t + ".")}
        for name, targets in graph.items()
    }
    assert "dino_jax.config" in graph["dino_jax.cli"]  # the parser sees real imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_hidden_cycle(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from dino_jax import trainer\n")
    assert imports_of("dino_jax.x", source, {"dino_jax", "dino_jax.trainer"}) == {
        "dino_jax",
        "dino_jax.trainer",
    }


# One interpreter imports the third-party packages, then forks a child per module of ours:
# each child starts with no dino_jax module loaded and imports just one.
ALONE = """
import importlib, os, sys, traceback
for name in ("numpy", "jax", "jax.numpy", "flax.linen", "optax", "ml_collections", "PIL.Image"):
    importlib.import_module(name)
assert not [m for m in sys.modules if m.split(".")[0] == "dino_jax"]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
print("FAILED", failed)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    names = list(module_names())
    result = subprocess.run(
        [sys.executable, "-c", ALONE, *names],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FAILED []" in result.stdout, result.stdout[-500:] + result.stderr[-3000:]
    assert len(names) > 50
