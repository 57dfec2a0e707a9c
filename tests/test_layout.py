"""The package's layout rules: small files, no import cycle, and a serving side that needs no
training code (docs/layout.md describes the modules and who imports whom)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dagfm_ext"
MAX_LINES = 400

# Modules a serving process must not load: the pipeline, its config, checkpoint and report, the
# model classes (the exported program holds the graph), the benchmarks, and the libraries only
# training uses. torch itself imports ``tqdm`` (torch.hub), so the check is on ``tqdm.auto``, the
# part the pipeline's progress bars use.
TRAINING_MODULES = ("dagfm_ext.distill", "dagfm_ext.config", "dagfm_ext.checkpoint", "dagfm_ext.export",
                    "dagfm_ext.kd_model", "dagfm_ext.report", "dagfm_ext.teachers", "dagfm_ext.modules",
                    "dagfm_ext.metrics", "dagfm_ext.distributed", "dagfm_ext.bench",
                    # the data side: loaders, preprocessing, cache and batches (serving needs the schema only)
                    "dagfm_ext.data.batches", "dagfm_ext.data.cache", "dagfm_ext.data.command",
                    "dagfm_ext.data.container", "dagfm_ext.data.datasets", "dagfm_ext.data.formats",
                    "dagfm_ext.data.movielens", "dagfm_ext.data.prefetch", "dagfm_ext.data.preprocess",
                    "dagfm_ext.data.spec", "dagfm_ext.data.synthetic")
TRAINING_LIBRARIES = ("tqdm.auto", "sklearn", "pyarrow")
# Compiled modules (built by setup.py, so absent from a fresh clone): leaves of the import graph.
EXTENSION_MODULES = ("dagfm_ext._C",)


def package_modules() -> dict:
    """Dotted module name -> source file, for every Python file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement, at module level or inside functions, except under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict:
    """Module -> the package modules it imports.

    Function-level imports count as edges too: a lazy import only delays a dependency, it does
    not remove it, so two modules that import each other, one of them lazily, are still a cycle.
    ``from X import name`` is an edge to ``X.name`` when that is a module, else to ``X``.
    Dynamic imports (``importlib``, such as the package's lazy attributes) are not seen.
    """
    modules = package_modules()
    known = set(modules) | set(EXTENSION_MODULES)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = here
                for _ in range(node.level - 1 if node.level else 0):
                    base = base.rpartition(".")[0]
                if node.level:
                    base = ".".join(p for p in (base, node.module) if p)
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules (first == last), or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def reachable(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def is_training_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in TRAINING_MODULES)


def test_no_python_file_over_the_line_limit():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these files by responsibility (at most {MAX_LINES} lines each): {long}"


def test_cycle_checker_itself():
    # A cycle is found and a chain is not; imports inside functions are seen, TYPE_CHECKING ones not.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("import os\ndef f():\n    from . import b\nif TYPE_CHECKING:\n    import c\n")
    assert sorted(type(n).__name__ for n in _imports(tree)) == ["Import", "ImportFrom"]


def test_no_import_cycle_among_package_modules():
    """Imports inside functions count (see import_graph): a module that imports another lazily
    still depends on it. Lazy imports that keep heavy modules out of light ones are fine as long
    as they do not close a cycle."""
    graph = import_graph()
    assert "dagfm_ext.serving" in graph and graph["dagfm_ext.distill"], "the graph missed the package"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_serving_code_reaches_no_training_module():
    # Statically, including imports inside functions: no code path of serving needs training code.
    reached = sorted(m for m in reachable(import_graph(), "dagfm_ext.serving") if is_training_module(m))
    assert reached == [], f"dagfm_ext.serving imports training modules: {reached}"


def test_importing_serving_loads_no_training_module():
    code = ("import json, sys\nimport dagfm_ext.serving\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('dagfm_ext', 'tqdm', 'sklearn')))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert "dagfm_ext.serving" in loaded
    training = [m for m in loaded if is_training_module(m)
                or any(m == lib or m.startswith(lib + ".") for lib in TRAINING_LIBRARIES)]
    assert training == [], f"importing dagfm_ext.serving loaded training modules: {training}"
