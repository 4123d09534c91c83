"""The shape of the code: no import cycles between the project's modules, and a core that names no pass.

Module-level imports only (an import inside a function body runs later and cannot form a cycle at
import time; the rule of the code base is to keep those for heavy optional dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "passes", "exporters")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def top_level_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``path`` imports when it is imported (statements at module level,
    ``if TYPE_CHECKING`` blocks left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(statements) -> None:
        for node in statements:
            if isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(filter(None, (resolve(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    target = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else resolve(base)
                    if target:
                        found.add(target)

    visit(tree.body)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: top_level_imports(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a module list that starts and ends with the same module), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_project_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_in_both_forms():
    graph = import_graph()
    assert "compress.errors" in graph["compress.recipe.loading"]  # from compress.errors import ...
    assert "compress.recipe.schema" in graph["compress.recipe"]  # a package's __init__ importing its parts
    assert graph["compress.run"], "the run package imports its parts"


def test_the_core_imports_no_pass_module():
    """Passes are found through the ``compress.passes`` entry points; no core module imports one."""
    graph = import_graph()
    offenders = {name: sorted(t for t in targets if t.startswith("passes."))
                 for name, targets in graph.items() if name.startswith("compress.")}
    assert not {k: v for k, v in offenders.items() if v}


def run_python(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_package_and_the_cli_loads_neither_torch_nor_transformers():
    assert run_python("import sys, compress, compress.cli, compress.registry, compress.errors; "
                      "print('torch' in sys.modules, 'transformers' in sys.modules)") == "False False"


def test_the_pruned_classes_are_registered_whichever_is_imported_first():
    check = ("from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
             "print('pruned_llama' in CONFIG_MAPPING)")
    assert run_python("import compress; " + check) == "True"
    assert run_python("import transformers, compress; " + check) == "True"
