"""Services share only protos/: no module of one service imports another service's package, lazily or not."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "tokenizer_svc", "engine_svc")
# `tandem prune` runs in its own process, never in a service: it tokenizes its calibration text and exports the
# pruned model's tokenizer with the tokenizer service's GGUF/HF loader rather than a second copy of it.
OFFLINE_TOOL_IMPORTS = {"engine_svc/pruning/calibration.py": ["tokenizer_svc"],
                        "engine_svc/pruning/hf_export.py": ["tokenizer_svc"]}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages every import statement of the file names, at any depth of the code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_scan_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from gateway.cli.model_fetch import x\n    import engine_svc.config\n")
    assert imported_packages(f) == {"gateway", "engine_svc"}


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    others = set(SERVICES) - {service}
    crossing = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & others)
                for p in sorted((ROOT / service).rglob("*.py"))}
    expected = {p: names for p, names in OFFLINE_TOOL_IMPORTS.items() if p.startswith(service + "/")}
    assert {p: names for p, names in crossing.items() if names} == expected
