"""The public API binds 127.0.0.1 unless told otherwise, and an exposed port without API keys is warned about."""
from __future__ import annotations

import asyncio

import pytest

from gateway.cli import main as cli
from gateway.admission import Admission
from gateway.auth import ENV_VAR
from gateway.config import GatewayConfig, config_from_args
from gateway.public_server import create_server, exposure_warning, is_loopback
from gateway.cli.service_commands import compose_topology, gateway_argv, local_topology


def test_every_entry_point_binds_loopback_by_default() -> None:
    assert GatewayConfig().host == "127.0.0.1"
    assert config_from_args([]).host == "127.0.0.1"                         # python -m gateway
    assert cli.parse_args(["serve"]).host == "127.0.0.1"                     # tandem serve
    argv = gateway_argv(cli.topology_from_args(cli.parse_args(["serve"]), "/m.gguf"))
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert local_topology("/m.gguf").gateway_host == "127.0.0.1"


def test_host_0000_exposes_it_and_compose_says_so_explicitly() -> None:
    assert config_from_args(["--host", "0.0.0.0"]).host == "0.0.0.0"
    argv = gateway_argv(cli.topology_from_args(cli.parse_args(["serve", "--host", "0.0.0.0"]), "/m.gguf"))
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    compose = gateway_argv(compose_topology())   # a container's port is reached through its own interface
    assert compose[compose.index("--host") + 1] == "0.0.0.0"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.53", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("::", False), ("10.0.0.5", False), ("myhost", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_warning_names_the_address_and_the_fix() -> None:
    warning = exposure_warning(GatewayConfig(host="0.0.0.0", port=50051, metrics_port=9090), ())
    assert warning is not None
    assert "0.0.0.0:50051 (and /metrics on port 9090) is reachable from other machines" in warning
    assert "no API key is configured" in warning and "--api-key-file or TANDEM_API_KEYS" in warning
    both = exposure_warning(GatewayConfig(host="0.0.0.0", port=50051, metrics_port=9090, http_port=8000), ())
    assert "0.0.0.0:50051 (and the HTTP API on port 8000 and /metrics on port 9090) is reachable" in both
    assert exposure_warning(GatewayConfig(host="0.0.0.0"), ("k",)) is None     # keys configured
    assert exposure_warning(GatewayConfig(host="127.0.0.1"), ()) is None      # loopback only


def _create(config: GatewayConfig) -> None:
    async def main():
        await create_server(config, Admission(config.max_in_flight, config.retry_after_ms)).stop(0)
    asyncio.run(main())


def test_the_gateway_logs_the_warning_when_exposed_without_keys(caplog, monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    _create(GatewayConfig(host="0.0.0.0"))
    assert [(r.levelname, r.getMessage()[:51]) for r in caplog.records] == [
        ("WARNING", "the public API on 0.0.0.0:50051 is reachable from o")]
    caplog.clear()
    _create(GatewayConfig())
    assert not caplog.records
    monkeypatch.setenv(ENV_VAR, "k1")
    _create(GatewayConfig(host="0.0.0.0"))
    assert not caplog.records
