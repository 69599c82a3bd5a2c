"""The supernet package's import graph: commands on top of the engine, the engine on top of the library,
no circle, no private name taken from another module (every import counted, also those inside functions)."""
from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "supernet")
COMMANDS = {"cli", "train", "distill", "finetune", "evaluate", "search", "export", "convert", "ablate", "boxplot"}
ENGINE = {"engine"}


def imports():
    """{module: {(imported module, imported name or None)}} for the package's relative imports."""
    graph = {}
    for file in sorted(os.listdir(PACKAGE)):
        if not file.endswith(".py"):
            continue
        module = file[:-3]
        tree = ast.parse(open(os.path.join(PACKAGE, file)).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found |= {(node.module, alias.name) for alias in node.names}
                else:
                    found |= {(alias.name, None) for alias in node.names}
        graph[module] = found
    return graph


GRAPH = imports()


def test_no_import_circle():
    edges = {module: {target for target, _ in found if target != module} for module, found in GRAPH.items()}

    def visit(module, path):
        for target in edges.get(module, ()):
            assert target not in path, f"import circle: {' -> '.join(path + [target])}"
            visit(target, path + [target])

    for module in edges:
        visit(module, [module])


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_one_way_and_take_no_private_names(module):
    for target, name in GRAPH[module]:
        assert not (name or "").startswith("_"), f"{module} imports the private {target}.{name}"
        if module not in COMMANDS:
            assert target not in COMMANDS, f"library module {module} imports the command module {target}"
        if module not in COMMANDS | ENGINE:
            assert target not in ENGINE, f"library module {module} imports the engine"
