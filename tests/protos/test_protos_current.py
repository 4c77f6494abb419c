"""The committed generated protobuf code equals what protos/generate.py produces from the .proto files."""
from __future__ import annotations

from pathlib import Path

from protos.generate import REPO_ROOT, generate


def test_generated_code_is_current(tmp_path: Path):
    fresh = generate(tmp_path)
    assert fresh, "no generated files"
    stale = []
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = REPO_ROOT / rel
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    committed_all = {p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "protos").rglob("*_pb2*.py*")}
    extra = committed_all - {p.relative_to(tmp_path) for p in fresh}
    assert not stale and not extra, f"run `python -m protos.generate`; stale: {stale}, orphaned: {sorted(extra)}"


def test_services_never_import_torch():
    """The gateway and the tokenizer service stay torch-free (they share only protos/ with the engine)."""
    import subprocess
    import sys

    code = ("import sys, gateway.server, gateway.cli.main, tokenizer_svc.server; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
