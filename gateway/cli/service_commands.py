"""The argv of each Tandem service, built from one frozen topology.

This is the single source of truth for how the three services are started: the `tandem serve` launcher runs
exactly these argvs, and tests/cli/test_compose.py checks that every `command:` in docker-compose.yml equals what
`compose_topology()` builds here. Change a flag here and the compose test tells you to update the compose file.

Pure functions only: nothing here starts a process, touches the network or reads the environment.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from gateway.cli.model_fetch import DEFAULT_GGUF_NAME
from protos.service_logging import check_logging

TOKENIZER = "tokenizer"
ENGINE = "engine"
GATEWAY = "gateway"
# Start order matters: the gateway dials both internal services, so they come first (in parallel).
SERVICE_NAMES = (TOKENIZER, ENGINE, GATEWAY)

DEFAULT_GATEWAY_PORT = 50051
DEFAULT_TOKENIZER_PORT = 50052
DEFAULT_ENGINE_PORT = 50053
DEFAULT_METRICS_PORT = 9090    # `tandem serve`'s and compose's; `python -m gateway` leaves metrics off
DEFAULT_HTTP_PORT = 8000       # the OpenAI-compatible HTTP API: likewise

# In docker compose the model service fetches into a named volume mounted here, with TANDEM_CACHE=/cache,
# so model_fetch.cache_dir() is /cache/models.
COMPOSE_CACHE = "/cache"
COMPOSE_MODEL_PATH = f"{COMPOSE_CACHE}/models/{DEFAULT_GGUF_NAME}"


def _check_port(name: str, port: int) -> None:
    # Port 0 ("pick any") is refused: the gateway must know where to dial the internal services.
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"{name} must be a TCP port in 1..65535, got {port!r}")


def _check_host(name: str, host: str) -> None:
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise ValueError(f"{name} must be a non-empty host name or address, got {host!r}")


@dataclass(frozen=True)
class ServiceTopology:
    """Where each service listens and how the gateway reaches the other two.

    `internal_listen_host` is the bind address of the tokenizer and engine; `tokenizer_host`/`engine_host` are
    the names the gateway dials (127.0.0.1 locally; the compose service names inside the compose network).
    """

    model_path: str
    python: str = sys.executable
    gateway_host: str = "127.0.0.1"     # the public API and /metrics; not loopback: reachable by other machines
    gateway_port: int = DEFAULT_GATEWAY_PORT
    internal_listen_host: str = "127.0.0.1"
    tokenizer_host: str = "127.0.0.1"
    tokenizer_port: int = DEFAULT_TOKENIZER_PORT
    engine_host: str = "127.0.0.1"
    engine_port: int = DEFAULT_ENGINE_PORT
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"          # engine --quantization; passed only when not "none"
    kv_cache_dtype: str = "auto"        # passed to the engine only when not its default
    engine_extra_args: tuple[str, ...] = field(default=())
    tokenizer_path: str | None = None   # another model's tokenizer (e.g. for a dummy-weight config); None: model_path
    lora_modules: tuple[str, ...] = ()  # NAME=PATH of the LoRA adapters the engine loads at start (--lora)
    engine_replicas: int = 1            # engines on engine_port, engine_port + 1, ...; the gateway dials them all
    metrics_port: int = 0               # the gateway's Prometheus /metrics port, on gateway_host; 0: off
    http_port: int = 0                  # the gateway's OpenAI-compatible HTTP API, on gateway_host; 0: off
    # TLS on the public port only: internal services stay plaintext on loopback (or the compose network).
    gateway_tls_cert: str | None = None
    gateway_tls_key: str | None = None
    gateway_extra_args: tuple[str, ...] = ()   # the gateway's own flags (API keys, limits, drain, logs), last
    # Only for the launcher's health probe of a TLS gateway: the CA to trust (default: the certificate file, right
    # for a self-signed one) and the name to check the certificate against (default: the dialled 127.0.0.1).
    gateway_tls_ca: str | None = None
    gateway_tls_server_name: str | None = None
    log_level: str = "info"             # every service's; passed only when not the default
    log_format: str = "text"

    def __post_init__(self) -> None:
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ValueError("model_path must be a non-empty string")
        if not isinstance(self.python, str) or not self.python:
            raise ValueError("python must be the interpreter to run the services with")
        for name in ("gateway_host", "internal_listen_host", "tokenizer_host", "engine_host"):
            _check_host(name, getattr(self, name))
        for name in ("gateway_port", "tokenizer_port", "engine_port"):
            _check_port(name, getattr(self, name))
        for name in ("device", "dtype", "quantization", "kv_cache_dtype"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or value.startswith("-"):
                raise ValueError(f"{name} must be a non-empty value, got {value!r}")
        if not isinstance(self.engine_extra_args, tuple) or not all(
                isinstance(a, str) for a in self.engine_extra_args):
            raise ValueError("engine_extra_args must be a tuple of strings")
        for module in self.lora_modules:
            name, sep, path = module.partition("=") if isinstance(module, str) else ("", "", "")
            if not (sep and name and path):
                raise ValueError(f"lora_modules entries must be NAME=PATH, got {module!r}")
        if not isinstance(self.engine_replicas, int) or isinstance(self.engine_replicas, bool) or not (
                1 <= self.engine_replicas <= 65535 - self.engine_port + 1):
            raise ValueError(f"engine_replicas must be >= 1 with every engine port <= 65535, got "
                             f"{self.engine_replicas!r} from port {self.engine_port}")
        for name in ("metrics_port", "http_port"):
            if getattr(self, name) != 0:
                _check_port(name, getattr(self, name))
        check_logging(self.log_level, self.log_format)
        if (self.gateway_tls_cert is None) != (self.gateway_tls_key is None):
            raise ValueError("gateway_tls_cert and gateway_tls_key go together")
        if not isinstance(self.gateway_extra_args, tuple) or not all(
                isinstance(a, str) for a in self.gateway_extra_args):
            raise ValueError("gateway_extra_args must be a tuple of strings")
        ports = (self.gateway_port, self.tokenizer_port, *engine_ports(self)) + tuple(
            p for p in (self.metrics_port, self.http_port) if p)
        if len(set(ports)) != len(ports):
            # All three share one host when run by the launcher, so a shared port is always a clash.
            raise ValueError(f"gateway, tokenizer, engine (and metrics, HTTP) ports must differ, got {ports}")


def local_topology(model_path: str, **overrides) -> ServiceTopology:
    """The `tandem serve` layout: internal services on loopback only, the gateway on gateway_host."""
    return ServiceTopology(model_path=model_path, **overrides)


def compose_topology() -> ServiceTopology:
    """The docker-compose layout: every service binds 0.0.0.0 inside the compose network (a container is reached
    through its own interface, never its loopback), the gateway dials the internal services by their compose
    names and serves /metrics and the HTTP API like `tandem serve`, and the engine is told `cuda` so that a container without the
    GPU reservation fails loudly instead of quietly running on the CPU."""
    return ServiceTopology(
        model_path=COMPOSE_MODEL_PATH,
        python="python",
        gateway_host="0.0.0.0",
        internal_listen_host="0.0.0.0",
        tokenizer_host=TOKENIZER,
        engine_host=ENGINE,
        device="cuda",
        metrics_port=DEFAULT_METRICS_PORT,
        http_port=DEFAULT_HTTP_PORT,
    )


def engine_ports(t: ServiceTopology) -> list[int]:
    return [t.engine_port + k for k in range(t.engine_replicas)]


def engine_names(t: ServiceTopology) -> list[str]:
    """`engine` alone, or `engine`, `engine-2`, ... for several replicas (each its own supervised service)."""
    return [ENGINE if k == 0 else f"{ENGINE}-{k + 1}" for k in range(t.engine_replicas)]


def tokenizer_argv(t: ServiceTopology) -> list[str]:
    return [t.python, "-m", "tokenizer_svc", "--model", t.tokenizer_path or t.model_path,
            "--host", t.internal_listen_host, "--port", str(t.tokenizer_port), *_logging_args(t)]


def engine_argv(t: ServiceTopology, replica: int = 0) -> list[str]:
    # Extra engine args go last, untouched: the engine's own parser decides what they mean.
    return [t.python, "-m", "engine_svc", "--model", t.model_path,
            "--host", t.internal_listen_host, "--port", str(engine_ports(t)[replica]),
            "--device", t.device, "--dtype", t.dtype,
            *(["--quantization", t.quantization] if t.quantization != "none" else []),
            *(("--kv-cache-dtype", t.kv_cache_dtype) if t.kv_cache_dtype != "auto" else ()),
            *(arg for module in t.lora_modules for arg in ("--lora", module)), *_logging_args(t),
            *t.engine_extra_args]


def gateway_argv(t: ServiceTopology) -> list[str]:
    return [t.python, "-m", "gateway", "--host", t.gateway_host, "--port", str(t.gateway_port),
            "--tokenizer", f"{t.tokenizer_host}:{t.tokenizer_port}",
            *(arg for port in engine_ports(t) for arg in ("--engine", f"{t.engine_host}:{port}")),
            *(["--metrics-port", str(t.metrics_port)] if t.metrics_port else []),
            *(["--http-port", str(t.http_port)] if t.http_port else []),
            *(("--tls-cert", t.gateway_tls_cert, "--tls-key", t.gateway_tls_key) if t.gateway_tls_cert else ()),
            *_logging_args(t), *t.gateway_extra_args]


def _logging_args(t: ServiceTopology) -> tuple[str, ...]:
    return (*(("--log-level", t.log_level) if t.log_level != "info" else ()),
            *(("--log-format", t.log_format) if t.log_format != "text" else ()))


def model_fetch_argv(python: str) -> list[str]:
    """The compose one-shot that fetches the default model (TANDEM_CACHE picks the directory)."""
    return [python, "-m", "gateway.cli.model_fetch"]


def service_argvs(t: ServiceTopology) -> dict[str, list[str]]:
    """Every service's argv, keyed by service name, in start order."""
    return {TOKENIZER: tokenizer_argv(t), **{name: engine_argv(t, k) for k, name in enumerate(engine_names(t))},
            GATEWAY: gateway_argv(t)}


def listen_addresses(t: ServiceTopology) -> dict[str, tuple[str, int]]:
    """The (host, port) each service binds, keyed like service_argvs."""
    return {TOKENIZER: (t.internal_listen_host, t.tokenizer_port),
            **{name: (t.internal_listen_host, port) for name, port in zip(engine_names(t), engine_ports(t))},
            GATEWAY: (t.gateway_host, t.gateway_port)}
