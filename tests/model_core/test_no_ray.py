"""model_core never imports ray: neither in its source nor transitively when imported."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import model_core

PACKAGE = Path(model_core.__file__).parent


def test_no_module_in_model_core_imports_ray():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not offenders


def test_importing_model_core_loads_no_ray():
    code = ("import sys, model_core, model_core.metrics, model_core.tasks, model_core.artifact; "
            "import pkgutil, importlib; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(model_core.__path__, 'model_core.')]; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
