"""The package's shape: no import cycles between its modules, counting imports inside functions (a cycle
hidden in a function still ties two modules together), and the package-level imports a user relies on."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import roadcascade

ROOT = Path(roadcascade.__file__).resolve().parent


def _module(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def import_graph() -> nx.DiGraph:
    """Module -> module it imports (anywhere in the file), for the modules of the package."""
    files = {(_module(p)): p for p in ROOT.rglob("*.py")}
    names = {m for m, _ in files}
    g = nx.DiGraph()
    g.add_nodes_from(names)
    for (mod, is_pkg), path in files.items():
        package = mod if is_pkg else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in names:  # an attribute or a module outside the package: its module
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):  # importing one's own package is not a cycle
                    g.add_edge(mod, t)
    return g


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles (counting imports inside functions): {cycles}"


@pytest.mark.parametrize("name", ["Cascade", "Tier", "TierOutput", "TierCaps", "register_tier", "ExitPoint", "Rule",
                                  "register_rule", "Fusion", "register_fusion"])
def test_public_names_of_the_cascade(name):
    import roadcascade.cascade.runtime as c

    assert hasattr(c, name)
