"""Several engine replicas in the configs: the gateway's flags, and `tandem serve --engine-replicas N`."""
from __future__ import annotations

import pytest

from gateway.cli import main as cli
from gateway.config import GatewayConfig, config_from_args
from gateway.cli.launcher import services_for
from gateway.cli.service_commands import engine_argv, gateway_argv, local_topology, service_argvs


def engines_dialled(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--engine"]


def test_gateway_takes_repeated_or_comma_separated_addresses():
    config = config_from_args(["--engine", "a:1", "--engine", "b:2, c:3", "--tokenizer", "t:1,u:2"])
    assert config.engine_addresses == ("a:1", "b:2", "c:3")
    assert config.tokenizer_addresses == ("t:1", "u:2")
    default = config_from_args([])
    assert default.engine_addresses == ("127.0.0.1:50053",) and default.tokenizer_addresses == ("127.0.0.1:50052",)
    assert default.routing == "prefix"
    assert config_from_args(["--routing", "round_robin"]).routing == "round_robin"


@pytest.mark.parametrize("kwargs, message", [
    ({"engine": "a:1,a:1"}, "distinct"),
    ({"engine": " , "}, "engine addresses"),
    ({"routing": "random"}, "routing"),
    ({"load_poll_interval_s": 2.0}, "within a second"),
])
def test_bad_gateway_routing_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatewayConfig(**kwargs)


def test_serve_engine_replicas_start_consecutive_ports_all_given_to_the_gateway():
    topology = cli.topology_from_args(cli.parse_args(["serve", "--engine-replicas", "3", "--engine-port", "6000"]),
                                      "/m/x.gguf")
    argvs = service_argvs(topology)
    assert list(argvs) == ["tokenizer", "engine", "engine-2", "engine-3", "gateway"]
    for k, name in enumerate(["engine", "engine-2", "engine-3"]):
        assert argvs[name] == engine_argv(topology, k)
        assert argvs[name][argvs[name].index("--port") + 1] == str(6000 + k)
    assert engines_dialled(gateway_argv(topology)) == ["127.0.0.1:6000", "127.0.0.1:6001", "127.0.0.1:6002"]
    stages = {s.name: (s.port, s.stage) for s in services_for(topology)}
    assert stages == {"tokenizer": (50052, 0), "engine": (6000, 0), "engine-2": (6001, 0), "engine-3": (6002, 0),
                      "gateway": (50051, 1)}


def test_one_engine_by_default():
    topology = local_topology("/m/x.gguf")
    assert list(service_argvs(topology)) == ["tokenizer", "engine", "gateway"]
    assert engines_dialled(gateway_argv(topology)) == ["127.0.0.1:50053"]


@pytest.mark.parametrize("replicas, port, message", [
    (0, 50053, "engine_replicas"), (3, 65534, "engine_replicas"), (2, 50051, "must differ"),
])
def test_bad_engine_replicas_are_refused(replicas, port, message):
    with pytest.raises(ValueError, match=message):
        local_topology("/m/x.gguf", engine_replicas=replicas, engine_port=port, gateway_port=50052,
                       tokenizer_port=50060)
