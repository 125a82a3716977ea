"""The shape of the package, checked statically: no import cycles, inference never reaches training code, short
functions. Every ``import`` statement counts, including those inside functions."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ldm"
TRAINING = {"ldm.loop", "ldm.train", "ldm.train_vae", "ldm.finetune", "ldm.mnist_text"}
# composition roots: the package's export list, and the command line's parser and training commands, which dispatch
# training; the inference commands (ldm.cli.sample, .generate, .checkpoints, .common) are checked like any module
ROOTS = {"ldm", "ldm.cli", "ldm.cli.train"}
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The ldm modules that ``name`` imports anywhere in its file (relative and absolute imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if node.module:  # `from . import x` imports the module x, not the package around it
                found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported_modules(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], stack[len(stack):] = "open", [node]
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or not, with the module that imports it first (for the error)."""
    seen, todo = {start: start}, [start]
    while todo:
        node = todo.pop()
        for nxt in graph[node]:
            if nxt not in seen:
                seen[nxt] = node
                todo.append(nxt)
    return seen


def test_the_checker_sees_imports_inside_functions_and_cycles(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    module = tmp_path / "fake.py"
    module.write_text("import torch\n\ndef f():\n    from .train import Trainer\n    from . import loop\n")
    assert imported_modules("ldm.fake", module, set(modules())) == {"ldm.train", "ldm.loop"}


def test_no_import_cycle():
    graph = import_graph()
    assert {"ldm.sampling", "ldm.loading", "ldm.stable_diffusion", "ldm.sd_checkpoint"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' → '.join(cycle)}"


def test_inference_never_imports_training_code():
    graph = import_graph()
    for name in sorted(set(graph) - TRAINING - ROOTS):
        via = reachable(graph, name)
        for training in sorted(TRAINING & set(via)):
            chain = [training]
            while chain[-1] != name:
                chain.append(via[chain[-1]])
            pytest.fail(f"{name} reaches training code: {' → '.join(reversed(chain))}")


def test_training_modules_are_reachable_from_the_roots_only():
    """The check above would pass vacuously if the training modules had vanished or were never imported."""
    graph = import_graph()
    assert TRAINING <= set(graph) and TRAINING <= set(reachable(graph, "ldm.cli"))


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "functions over 60 lines: " + ", ".join(long)


def test_train_is_the_module():
    """``ldm.train`` is the module, not a function exported over it."""
    code = "import sys, ldm.train; ldm.train.TrainConfig; assert sys.modules['ldm'].train is sys.modules['ldm.train']"
    subprocess.run([sys.executable, "-c", code], check=True)
