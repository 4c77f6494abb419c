"""python -m tokenizer_svc --model PATH [--host 127.0.0.1] [--port 50052]"""
from __future__ import annotations

import asyncio
import sys

from tokenizer_svc.config import parse_args
from tokenizer_svc.loading import load_tokenizer
from tokenizer_svc.server import serve


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        loaded = load_tokenizer(config.model)
    except (ValueError, OSError) as exc:
        print(f"tokenizer_svc: cannot load a tokenizer from {config.model}: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # not on Windows
        asyncio.run(serve(config, loaded))
    else:
        uvloop.run(serve(config, loaded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
