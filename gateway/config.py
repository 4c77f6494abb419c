"""Gateway configuration: parsed from the command line, validated once, frozen."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    engine: str = "127.0.0.1:50053"
    tokenizer: str = "127.0.0.1:50052"
    default_max_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_cache_salt_chars: int = 256
    max_logit_bias: int = 1024
    max_n: int = 16                 # n, best_of and the beam width
    max_logprobs: int = 20          # alternatives per token for logprobs and prompt_logprobs
    connect_timeout_s: float = 60.0
    metrics_port: int = 0           # Prometheus /metrics over HTTP on the gateway's host; 0: off

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("port must be in [0, 65535]")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError("metrics_port must be in [0, 65535] (0: off)")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port and port must differ, both are {self.port}")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if not self.engine or not self.tokenizer:
            raise ValueError("engine and tokenizer addresses are required")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description="Tandem gateway: the public gRPC API.")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--engine", default="127.0.0.1:50053", help="engine service address")
    p.add_argument("--tokenizer", default="127.0.0.1:50052", help="tokenizer service address")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--connect-timeout-s", type=float, default=60.0)
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this HTTP port "
                                                                "(default 0: off)")
    return p


def config_from_args(argv: list[str] | None = None) -> GatewayConfig:
    return GatewayConfig(**vars(build_parser().parse_args(argv)))
