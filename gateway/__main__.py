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
        import uvloop
        uvloop.run(serve(config))
    except ImportError:
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
