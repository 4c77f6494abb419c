"""Gateway configuration: parsed from the command line, validated once, frozen."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from gateway.router import POLICIES


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    engine: str = "127.0.0.1:50053"      # one address, or several separated by commas (one per engine replica)
    tokenizer: str = "127.0.0.1:50052"   # likewise
    default_max_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_cache_salt_chars: int = 256
    max_logit_bias: int = 1024
    max_n: int = 16                 # n, best_of and the beam width
    max_logprobs: int = 20          # alternatives per token for logprobs and prompt_logprobs
    connect_timeout_s: float = 60.0
    routing: str = "prefix"             # gateway.router.POLICIES
    routing_load_margin: float = 4.0    # how much busier than the least-loaded replica a prefix holder may be
    load_poll_interval_s: float = 0.25  # GetLoad per replica; a failed poll marks the replica down

    @property
    def engine_addresses(self) -> tuple[str, ...]:
        return _addresses(self.engine)

    @property
    def tokenizer_addresses(self) -> tuple[str, ...]:
        return _addresses(self.tokenizer)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("port must be in [0, 65535]")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if not self.engine or not self.tokenizer:
            raise ValueError("engine and tokenizer addresses are required")
        for name, addresses in (("engine", self.engine_addresses), ("tokenizer", self.tokenizer_addresses)):
            if not addresses or len(set(addresses)) != len(addresses):
                raise ValueError(f"{name} addresses must be non-empty and distinct, got {getattr(self, name)!r}")
        if self.routing not in POLICIES:
            raise ValueError(f"routing must be one of {', '.join(POLICIES)}, got {self.routing!r}")
        if self.routing_load_margin < 0:
            raise ValueError("routing_load_margin must be >= 0")
        if not 0 < self.load_poll_interval_s <= 1.0:
            raise ValueError("load_poll_interval_s must be in (0, 1]: a lost replica is marked down within a second")


def _addresses(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def _join(values: list[str] | None, default: str) -> str:
    """--engine A --engine B and --engine A,B mean the same."""
    return ",".join(values) if values else default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description="Tandem gateway: the public gRPC API.")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--engine", action="append", help="engine service address; repeat, or separate with commas, "
                                                     "for several replicas (default 127.0.0.1:50053)")
    p.add_argument("--tokenizer", action="append", help="tokenizer service address; repeatable like --engine "
                                                        "(default 127.0.0.1:50052)")
    p.add_argument("--routing", choices=POLICIES, default="prefix",
                   help="how requests are spread over engine replicas (default %(default)s)")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--connect-timeout-s", type=float, default=60.0)
    return p


def config_from_args(argv: list[str] | None = None) -> GatewayConfig:
    args = vars(build_parser().parse_args(argv))
    args["engine"] = _join(args["engine"], GatewayConfig.engine)
    args["tokenizer"] = _join(args["tokenizer"], GatewayConfig.tokenizer)
    return GatewayConfig(**args)
