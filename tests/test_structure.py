"""The shape of the source tree: no import circle, every module imports on its own, size limits.

The import graph is read from the sources with `ast`: every `import` of a forkrl module, at module
level or inside a function (a function-level import only postpones a circle), except under
`if TYPE_CHECKING:`. `from package import name` counts as an import of `package.name` when that is
a module, else of `package`.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "forkrl"

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
FUNCTION_LIMITED = ("train", "algo", "rollout", "ops")
MAX_POSITIONAL_PARAMETERS = 5


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of src/forkrl (a package by its `__init__.py`)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(node: ast.AST):
    """Import statements under `node`, skipping `if TYPE_CHECKING:` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for stmt in child.orelse for n in _imports_of(stmt))
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    """Module -> the forkrl modules it imports."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules}
                continue
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    edges.add(target)
                elif base in modules:
                    edges.add(base)
        graph[name] = edges - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_no_import_circle():
    cycles = import_cycles(import_graph())
    assert not cycles, "modules that import each other (directly or around a circle):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


# Imports each module with no forkrl module loaded before it (third-party packages stay loaded: a
# fresh interpreter per module would spend minutes importing torch again and again).
_IMPORT_EACH_ALONE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "forkrl" or m.startswith("forkrl.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    names = list(module_files())
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_ALONE, *names],
        capture_output=True,
        text=True,
        cwd=SRC.parent,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_no_source_file_is_over_600_lines():
    lines = {str(p.relative_to(SRC)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in lines.items() if n > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_of_the_core_packages_is_over_80_lines():
    """In train/, algo/, rollout/ and ops/: from the first decorator to the last line, docstring included."""
    long = {}
    for part in FUNCTION_LIMITED:
        for path in (PACKAGE / part).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                    if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                        long[f"{path.relative_to(SRC)}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def positional_parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The parameters a call may pass by position (`self`/`cls` first not counted; `*args` and
    keyword-only ones are not positional)."""
    names = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def test_positional_parameters_are_counted_without_self():
    tree = ast.parse("class A:\n    def f(self, a, b, *args, c, d=1): ...\ndef g(a, /, b, c=2): ...")
    counted = {n.name: positional_parameters(n) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert counted == {"f": ["a", "b"], "g": ["a", "b", "c"]}


def test_no_function_of_train_takes_more_than_5_positional_parameters():
    """In train/, the recipe's wiring: a part that needs more takes a context object
    (`forkrl.train.context.TrainContext`) or a dataclass of what it needs."""
    wide = {}
    for path in (PACKAGE / "train").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if len(params := positional_parameters(node)) > MAX_POSITIONAL_PARAMETERS:
                    wide[f"{path.relative_to(SRC)}:{node.lineno}:{node.name}"] = len(params)
    assert not wide, f"functions with more than {MAX_POSITIONAL_PARAMETERS} positional parameters: {wide}"
