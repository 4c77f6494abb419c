"""The tokenizer service's configuration: one frozen dataclass, validated once when it is built."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from protos.service_logging import add_logging_args, check_logging

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052


@dataclass(frozen=True)
class TokenizerServiceConfig:
    model: Path            # an HF model directory or a .gguf file
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0 binds an ephemeral port (tests)
    grace_s: float = 2.0   # how long in-flight RPCs may finish on SIGTERM/SIGINT
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        model = Path(self.model).expanduser()
        object.__setattr__(self, "model", model)
        if model.is_dir():
            if not (model / "tokenizer.json").is_file():
                raise ValueError(f"model directory {model} has no tokenizer.json")
        elif not model.is_file():
            raise ValueError(f"model path {model} is neither a directory nor a file")
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")
        check_logging(self.log_level, self.log_format)
        if self.grace_s < 0:
            raise ValueError(f"grace_s {self.grace_s} must be >= 0")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_args(argv: list[str] | None = None) -> TokenizerServiceConfig:
    parser = argparse.ArgumentParser(prog="python -m tokenizer_svc",
                                     description="Tandem tokenizer service (gRPC tandem.internal.v1.Tokenizer).")
    parser.add_argument("--model", required=True,
                        help="an HF model directory (tokenizer.json, tokenizer_config.json) or a .gguf file")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    add_logging_args(parser)
    args = parser.parse_args(argv)
    try:
        return TokenizerServiceConfig(model=Path(args.model), host=args.host, port=args.port,
                                      log_level=args.log_level, log_format=args.log_format)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
