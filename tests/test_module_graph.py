"""The package's modules import each other in one direction: no import cycle (imports inside
functions included), and nothing but the package's __init__ imports the trainer, whose helpers
(coba_training, eval_padding, chunked_loss, run_artifacts, ...) are handed what they need."""

import ast

from .conftest import REPO

PACKAGE = REPO / "mft_trainer"


def package_imports() -> dict[str, set[str]]:
    """Module name -> the package modules it imports (anywhere in its code)."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mft_trainer."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("mft_trainer.")}
        graph[path.stem] = imported
    return graph


def test_no_module_imports_another_that_imports_it_back():
    graph = package_imports()
    graph.pop("__init__")
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done or module not in graph:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_only_the_package_imports_the_trainer():
    importers = sorted(module for module, imported in package_imports().items() if "trainer" in imported)
    assert importers == ["__init__"]
