"""The package layout keeps its promises: no import cycle between modules (at module level or inside
functions), stage packages only import downward, and `inference` never imports `dicom_node`."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.peers import REPO

# A package may import the ones listed after it, never one before it (the entry point aside).
ORDER = ("ops", "receive", "pipeline", "dispatch", "results", "store", "config", "(base)")


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in (REPO / package).rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {t for t in targets if t in known and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules("dicom_node")
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()
            if not name.endswith("__main__")}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (REPO / "dicom_node" / parts[-1]).is_dir() else "(base)"


def test_no_module_imports_itself_through_others():
    graph = _graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(graph.get(module, ())):
            assert seen.get(target) != 1, "import cycle: " + " -> ".join(path + [module, target])
            if target not in seen:
                visit(target, path + [module])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [])


def test_stage_packages_import_only_downward():
    upward = sorted(f"{module} -> {target}" for module, targets in _graph().items() for target in targets
                    if ORDER.index(_stage(target)) < ORDER.index(_stage(module)))
    assert upward == []


def test_the_inference_package_never_imports_dicom_node():
    offenders = []
    for name, path in _modules("inference").items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] == "dicom_node"]
    assert offenders == []
