"""The `tandem` command is a client of the services, not part of them: importing every module of the gateway
service leaves gateway.cli unimported, and no engine or tokenizer module imports it at import time."""
from __future__ import annotations

import subprocess
import sys

_IMPORT_ALL_BUT_CLI = """
import importlib, pkgutil, sys, {package}
def walk(package):   # pkgutil.walk_packages would import gateway.cli itself to look inside it
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name == "gateway.cli" or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        if info.ispkg:
            walk(module)
walk({package})
print(sorted(m for m in sys.modules if m == "gateway.cli" or m.startswith("gateway.cli.")))
"""


def _cli_modules_loaded_by(package: str) -> str:
    out = subprocess.run([sys.executable, "-c", _IMPORT_ALL_BUT_CLI.format(package=package)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_no_gateway_service_module_imports_the_command():
    assert _cli_modules_loaded_by("gateway") == "[]"


def test_no_tokenizer_module_imports_the_command():
    assert _cli_modules_loaded_by("tokenizer_svc") == "[]"
