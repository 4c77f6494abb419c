"""`python -m engine_svc --model PATH`: serve the engine over gRPC."""
from __future__ import annotations

import asyncio
import logging
import sys

from engine_svc.config import config_from_args
from engine_svc.service.server import serve
from protos.service_logging import setup_logging

_LOG = logging.getLogger("tandem.engine")


def main() -> None:
    try:
        config = config_from_args()
    except ValueError as e:
        setup_logging("engine")
        _LOG.error("%s", e)
        sys.exit(1)
    try:
        import uvloop
        uvloop.run(serve(config))
    except ImportError:
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
