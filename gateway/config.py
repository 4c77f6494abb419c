"""Gateway configuration: parsed from the command line, validated once, frozen."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from gateway.router import POLICIES
from protos.service_logging import add_logging_args, check_logging


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"             # loopback, like llama.cpp and Ollama; 0.0.0.0 exposes the API (and /metrics)
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
    max_structured_output_chars: int = 256 * 1024   # a JSON schema, regex or grammar (choices together)
    max_choices: int = 1024         # entries of a structured_output choice list
    connect_timeout_s: float = 60.0
    metrics_port: int = 0           # Prometheus /metrics over HTTP on the gateway's host; 0: off
    http_port: int = 0              # the OpenAI-compatible HTTP API (and /metrics, /health) on the same host; 0: off
    # Security, backpressure, lifecycle and logs (see gateway/auth.py, tls.py, admission.py, request_log.py).
    api_key_file: str | None = None     # plus TANDEM_API_KEYS; no keys at all: authentication off
    tls_cert: str | None = None         # PEM; with tls_key, the public port speaks TLS
    tls_key: str | None = None
    max_in_flight: int | None = None    # generation calls in flight; past it RESOURCE_EXHAUSTED + retry-after-ms;
                                        # None: what the engines queue (gateway/admission.py engines_bound)
    retry_after_ms: int = 1000          # the retry hint sent with every RESOURCE_EXHAUSTED for capacity
    max_request_bytes: int = 4 * 1024 * 1024   # gRPC max receive message size on the public port
    max_prompt_chars: int = 1_000_000   # prompt, or all chat message contents together
    drain_timeout_s: float = 30.0       # after SIGTERM, how long in-flight calls may still run
    log_level: str = "info"             # every log line (protos/service_logging.py)
    log_format: str = "text"
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
        check_logging(self.log_level, self.log_format)
        if not 0 <= self.port < 65536:
            raise ValueError("port must be in [0, 65535]")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError("metrics_port must be in [0, 65535] (0: off)")
        if not 0 <= self.http_port < 65536:
            raise ValueError("http_port must be in [0, 65535] (0: off)")
        ports = [p for p in (self.port, self.metrics_port, self.http_port) if p]
        if len(set(ports)) != len(ports):
            raise ValueError(f"port, metrics_port and http_port must differ, got {self.port}, {self.metrics_port} "
                             f"and {self.http_port}")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if not self.engine or not self.tokenizer:
            raise ValueError("engine and tokenizer addresses are required")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        for name in ("max_in_flight", "retry_after_ms", "max_request_bytes", "max_prompt_chars"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
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
    p.add_argument("--host", default=GatewayConfig.host,
                   help="address the public API and /metrics bind (default %(default)s: this machine only; "
                        "0.0.0.0 exposes them, as in a container)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--engine", action="append", help="engine service address; repeat, or separate with commas, "
                                                     "for several replicas (default 127.0.0.1:50053)")
    p.add_argument("--tokenizer", action="append", help="tokenizer service address; repeatable like --engine "
                                                        "(default 127.0.0.1:50052)")
    p.add_argument("--routing", choices=POLICIES, default="prefix",
                   help="how requests are spread over engine replicas (default %(default)s)")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--connect-timeout-s", type=float, default=60.0)
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this HTTP port "
                                                                "(default 0: off)")
    p.add_argument("--http-port", type=int, default=0,
                   help="serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
                        "/health, /metrics) on this port of --host (default 0: off)")
    p.add_argument("--api-key-file", help="API keys, one per line (also: env TANDEM_API_KEYS, comma-separated); "
                                          "public RPCs then need metadata 'authorization: Bearer <key>'")
    p.add_argument("--tls-cert", help="PEM certificate (chain) for TLS on the public port")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="generation calls in flight; beyond it RESOURCE_EXHAUSTED with a retry-after-ms hint "
                        "(default: what the engines queue, the sum over replicas of their max_num_seqs + "
                        "max_waiting)")
    p.add_argument("--retry-after-ms", type=int, default=1000, help="the retry hint sent with RESOURCE_EXHAUSTED")
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request message accepted on the public port")
    p.add_argument("--max-prompt-chars", type=int, default=1_000_000,
                   help="longest prompt (or all chat contents together) in characters")
    p.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, default=30.0,
                   help="after SIGTERM, seconds in-flight calls may run before they end with UNAVAILABLE")
    add_logging_args(p)
    return p


def config_from_args(argv: list[str] | None = None) -> GatewayConfig:
    args = vars(build_parser().parse_args(argv))
    args["engine"] = _join(args["engine"], GatewayConfig.engine)
    args["tokenizer"] = _join(args["tokenizer"], GatewayConfig.tokenizer)
    return GatewayConfig(**args)
