"""`python -m gateway`: serve the public API."""
from __future__ import annotations

import asyncio
import sys

from gateway.config import config_from_args
from gateway.server import serve


def main() -> None:
    try:
        config = config_from_args()
    except ValueError as e:
        sys.exit(f"gateway: {e}")
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(config))
        else:
            uvloop.run(serve(config))
    except ValueError as e:   # an unreadable key file or TLS file: a message, not a traceback
        sys.exit(f"gateway: {e}")


if __name__ == "__main__":
    main()
