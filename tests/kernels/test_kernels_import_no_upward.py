"""engine_svc.kernels is the bottom layer: its modules import nothing from the engine above them (attention, quant,
lora, models, ...), which all import the kernels."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import engine_svc.kernels

REPO = Path(__file__).resolve().parents[2]
KERNELS_DIR = Path(engine_svc.kernels.__file__).parent

# A fresh interpreter where every engine_svc module outside engine_svc.kernels is unimportable. The package
# engine_svc itself stays importable (it is the parent of engine_svc.kernels); its __init__ holds only a docstring,
# and anything it imported from engine_svc would be refused by the same finder.
_IMPORT_EVERY_KERNEL_MODULE = """
import importlib, pkgutil, sys

class RefuseUpward:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("engine_svc.") and fullname.split(".")[1] != "kernels":
            raise ImportError(f"engine_svc.kernels imported {fullname}, a layer above it")
        return None

sys.meta_path.insert(0, RefuseUpward())
import engine_svc.kernels
names = [m.name for m in pkgutil.iter_modules(engine_svc.kernels.__path__, "engine_svc.kernels.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_every_kernel_module_imports_with_the_layers_above_refused():
    run = subprocess.run([sys.executable, "-c", _IMPORT_EVERY_KERNEL_MODULE], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == len(list(pkgutil.iter_modules([str(KERNELS_DIR)])))


def test_no_kernel_function_imports_a_layer_above_lazily():
    """The finder above sees only what runs at import; an import inside a function would slip past it."""
    upward = []
    for path in sorted(KERNELS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            upward += [f"{path.name}: {n}" for n in names
                       if n.startswith("engine_svc.") and not n.startswith("engine_svc.kernels")]
    assert upward == []
