"""Imports point one way: data_prep <- estimator <- export <- mmrecall_cli.

`mmrecall_testing` (fixtures shared by tests and benches) may import the three libraries;
nothing in them (nor the command line) imports it, tests/ or bench/. Project imports sit at
module top; one inside a function or class needs a comment on its line saying why.
Checked on the source (ast), without importing anything.
"""
import ast
import io
import os
import tokenize
from typing import List, Optional, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Package -> layer; a module may import its own layer and lower ones.
LAYERS = {"data_prep": 0, "estimator": 1, "export": 2, "retrieval": 3, "mmrecall_cli": 4}
TESTING = "mmrecall_testing"
TESTING_MAY_IMPORT = {"data_prep", "estimator", "export"}
# Top-level names of this repository's code that is not a library.
NOT_LIBRARIES = {TESTING, "tests", "bench"}
PROJECT = set(LAYERS) | NOT_LIBRARIES
CHECKED = sorted(LAYERS) + [TESTING]


def _imported_packages(node: ast.AST, module: str) -> List[str]:
    """Top-level package names an Import/ImportFrom node of `module` imports."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if node.level:                 # relative: within the importer's own package
        return [module.split(".")[0]]
    return [node.module.split(".")[0]] if node.module else []


def _comment_lines(source: str) -> Set[int]:
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            lines.add(tok.start[0])
    return lines


def _not_allowed(importer: str, imported: str) -> Optional[str]:
    """Why package `importer` may not import package `imported` (None: it may)."""
    if importer in LAYERS:
        if imported in NOT_LIBRARIES:
            return f"library code imports {imported}"
        if imported in LAYERS and LAYERS[imported] > LAYERS[importer]:
            return f"{importer} (layer {LAYERS[importer]}) imports the higher layer " \
                   f"{imported} (layer {LAYERS[imported]})"
    elif importer == TESTING and imported in PROJECT - TESTING_MAY_IMPORT - {TESTING}:
        return f"{TESTING} imports {imported} (it may import only the libraries)"
    return None


def violations(module: str, source: str, path: str = "<string>") -> List[str]:
    """Import-direction and import-placement problems of one module's source.

    Args:
      module: the dotted module name, e.g. "export.rank" (its first part is the package).
      source: the module's Python source.
      path: the file name used in messages.
    Returns:
      ["path:line: problem"], empty when the module is fine.
    """
    tree = ast.parse(source, path)
    comments = _comment_lines(source)
    importer = module.split(".")[0]
    problems = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for imported in _imported_packages(child, module):
                    if imported not in PROJECT:
                        continue
                    reason = _not_allowed(importer, imported)
                    if reason:
                        problems.append(f"{path}:{child.lineno}: {reason}")
                    lines = range(child.lineno, (child.end_lineno or child.lineno) + 1)
                    if nested and not comments.intersection(lines):
                        problems.append(f"{path}:{child.lineno}: project import of {imported} "
                                        f"inside a function or class without a comment "
                                        f"saying why")
            visit(child, nested or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)))

    visit(tree, False)
    return problems


def _modules():
    """(dotted module name, path) of every .py file of the checked packages."""
    found = []
    for package in CHECKED:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found.append((rel[:-len(".__init__")] if rel.endswith(".__init__")
                                  else rel, path))
    return found


def test_every_package_is_found():
    packages = {m.split(".")[0] for m, _ in _modules()}
    assert packages == set(CHECKED)
    assert len(_modules()) > 30


@pytest.mark.parametrize("module, path", _modules(), ids=[m for m, _ in _modules()])
def test_module_imports_point_one_way(module, path):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    assert violations(module, source, os.path.relpath(path, ROOT)) == []


# --- the checker itself fails on what it must refuse ------------------------------------
@pytest.mark.parametrize("module, source, expected", [
    ("estimator.train", "from export import best_exporter\n", "imports the higher layer export"),
    ("data_prep.prep", "import estimator.config\n", "imports the higher layer estimator"),
    ("export.rank", "from mmrecall_cli import train\n", "imports the higher layer mmrecall_cli"),
    ("export.saved_model", "from mmrecall_testing import export_fixtures\n",
     "library code imports mmrecall_testing"),
    ("mmrecall_cli.train", "import tests.export_test\n", "library code imports tests"),
    ("data_prep.synth.world", "from bench import quality\n", "library code imports bench"),
    ("mmrecall_testing.export_fixtures", "from mmrecall_cli import train\n",
     "mmrecall_testing imports mmrecall_cli"),
    # A function-level project import needs a comment on its line.
    ("export.rank", "def f():\n    from data_prep import schema\n    return schema\n",
     "inside a function or class without a comment"),
    ("export.rank", "class A:\n    from data_prep import (\n        schema)\n",
     "inside a function or class without a comment"),
    # Both problems at once: a hidden upward import.
    ("estimator.train", "def main():\n    from export.export import main\n",
     "imports the higher layer export"),
])
def test_checker_refuses(module, source, expected):
    found = violations(module, source)
    assert any(expected in p for p in found), found


@pytest.mark.parametrize("module, source", [
    ("export.rank", "from data_prep import schema\nfrom estimator import outputs\n"),
    ("mmrecall_cli.train", "from export.best_exporter import BestNdcgExporter\n"),
    ("mmrecall_testing.export_fixtures", "from export import saved_model\nimport numpy\n"),
    ("estimator.input_fn", "from . import config\nfrom .layers import x\n"),
    ("export.rank", "def f():\n    import tensorflow as tf  # not a project import\n"),
    ("export.rank", "def f():\n    import json\n"),
    ("export.rank", "def f():\n    from data_prep import text  # optional spaCy: only here\n"),
    ("export.rank", "def f():\n    from data_prep import (  # heavy, only for f\n"
                    "        text)\n"),
])
def test_checker_accepts(module, source):
    assert violations(module, source) == []
