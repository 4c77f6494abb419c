"""`python -m gateway`: serve the public API."""
from __future__ import annotations

import asyncio
import logging
import sys

from gateway.config import config_from_args
from gateway.server import serve
from protos.service_logging import setup_logging

_LOG = logging.getLogger("tandem.gateway")


def main() -> None:
    try:
        config = config_from_args()
    except ValueError as e:
        setup_logging("gateway")
        _LOG.error("%s", e)
        sys.exit(1)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(config))
        else:
            uvloop.run(serve(config))
    except ValueError as e:   # an unreadable key file or TLS file: a message, not a traceback
        _LOG.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
