"""`python -m engine_svc --model PATH`: serve the engine over gRPC."""
from __future__ import annotations

import asyncio
import sys

from engine_svc.config import config_from_args
from engine_svc.service.server import serve


def main() -> None:
    try:
        config = config_from_args()
    except ValueError as e:
        sys.exit(f"engine_svc: {e}")
    try:
        import uvloop
        uvloop.run(serve(config))
    except ImportError:
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
