"""python -m tokenizer_svc --model PATH [--host 127.0.0.1] [--port 50052]"""
from __future__ import annotations

import logging
import asyncio
import sys

from protos.service_logging import setup_logging
from tokenizer_svc.config import parse_args
from tokenizer_svc.loading import load_tokenizer
from tokenizer_svc.server import serve

_LOG = logging.getLogger("tandem.tokenizer")


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging("tokenizer", config.log_level, config.log_format)
    try:
        loaded = load_tokenizer(config.model)
    except (ValueError, OSError) as exc:
        _LOG.error("cannot load a tokenizer from %s: %s", config.model, exc)
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
