"""docker-compose.yml and the Dockerfiles, checked without a Docker engine.

The compose commands must be exactly gateway/cli/service_commands.py's argvs for the compose topology, so `tandem
serve` and `docker compose up` cannot drift apart; torch must stay out of the gateway/tokenizer image.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gateway.cli import main as cli, model_fetch
from gateway.cli.launcher import services_for
from gateway.cli.service_commands import (COMPOSE_CACHE, COMPOSE_MODEL_PATH, DEFAULT_METRICS_PORT, ENGINE, GATEWAY,
                                          TOKENIZER, compose_topology, listen_addresses, model_fetch_argv,
                                          service_argvs)

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_DOCKERFILE = "gateway/Dockerfile"
ENGINE_DOCKERFILE = "engine_svc/Dockerfile"
CPU_REQUIREMENTS = REPO_ROOT / "gateway" / "requirements-cpu.txt"
TORCH_PACKAGES = {"torch", "triton", "xgrammar"}   # xgrammar requires torch: the engine image only


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _dockerfile_instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    lines = [line for line in (REPO_ROOT / path).read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for parts in (line.strip().split(None, 1) for line in joined.splitlines()) if parts]


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec.strip(), maxsplit=1)[0].lower()


def _normalized(spec: str) -> str:
    return re.sub(r"\s+", "", spec).replace('"', "'")


def test_compose_has_the_services(services) -> None:
    assert set(services) == {"model", TOKENIZER, ENGINE, GATEWAY}


def test_commands_are_the_service_commands_argvs(services) -> None:
    topology = compose_topology()
    for name, argv in service_argvs(topology).items():
        assert services[name]["command"] == argv, f"{name}: docker-compose.yml and service_commands differ"
    assert services["model"]["command"] == model_fetch_argv(topology.python)
    # The gateway dials the internal services by names that are compose services.
    assert topology.tokenizer_host in services and topology.engine_host in services


def test_compose_commands_are_what_the_launcher_runs(services) -> None:
    """The launcher's own specs for the compose layout run exactly the compose commands, and those differ from
    `tandem serve`'s defaults only where a container must: addresses, device, paths, the interpreter and the
    drain (compose's stop_grace_period covers the gateway's own 30 s; `tandem serve` passes 8)."""
    for spec in services_for(compose_topology()):
        assert services[spec.name]["command"] == list(spec.argv), spec.name
    local = service_argvs(cli.topology_from_args(cli.parse_args(["serve"]), "/m.gguf"))
    for name, argv in service_argvs(compose_topology()).items():
        flags = lambda a: [x for x in a if x.startswith("--")]  # noqa: E731
        assert flags(argv) == [f for f in flags(local[name]) if f != "--drain-timeout"], name


def test_compose_serves_metrics_and_the_gateway_binds_every_interface(services) -> None:
    command = services[GATEWAY]["command"]
    assert command[command.index("--metrics-port") + 1] == str(DEFAULT_METRICS_PORT)
    assert command[command.index("--host") + 1] == "0.0.0.0"


def test_the_model_path_is_in_the_volume_the_model_service_fills(services, monkeypatch) -> None:
    assert services["model"]["environment"]["TANDEM_CACHE"] == COMPOSE_CACHE
    monkeypatch.setenv("TANDEM_CACHE", COMPOSE_CACHE)
    assert str(model_fetch.default_model_path()) == COMPOSE_MODEL_PATH  # where model_fetch will write it
    assert services["model"]["volumes"] == [f"models:{COMPOSE_CACHE}"]
    for name in (TOKENIZER, ENGINE):
        assert services[name]["volumes"] == [f"models:{COMPOSE_CACHE}:ro"]
        assert services[name]["depends_on"]["model"]["condition"] == "service_completed_successfully"


def test_engine_reserves_a_gpu(services) -> None:
    devices = services[ENGINE]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_only_the_gateway_is_published(services) -> None:
    topology = compose_topology()
    port, metrics, http = topology.gateway_port, topology.metrics_port, topology.http_port
    # The API on every host interface; /metrics, which has no authentication, on the host's loopback only, and so
    # the HTTP API, which serves /metrics too.
    assert services[GATEWAY]["ports"] == [f"{port}:{port}", f"127.0.0.1:{metrics}:{metrics}",
                                          f"127.0.0.1:{http}:{http}"]
    for name in ("model", TOKENIZER, ENGINE):
        assert "ports" not in services[name], f"{name} must not be published"


def test_healthchecks_probe_each_service_over_grpc_health(services) -> None:
    for name, (_host, port) in listen_addresses(compose_topology()).items():
        assert services[name]["healthcheck"]["test"] == ["CMD", "python", "-m", "gateway.cli.healthcheck",
                                                         f"127.0.0.1:{port}"]
    assert services[GATEWAY]["depends_on"] == {TOKENIZER: {"condition": "service_healthy"},
                                               ENGINE: {"condition": "service_healthy"}}


def test_images_split_on_torch(services) -> None:
    for name in ("model", TOKENIZER, GATEWAY):
        assert services[name]["build"]["dockerfile"] == CPU_DOCKERFILE
    assert services[ENGINE]["build"]["dockerfile"] == ENGINE_DOCKERFILE
    for service in services.values():
        assert (REPO_ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_the_cpu_image_never_installs_torch() -> None:
    runs = [args for instr, args in _dockerfile_instructions(CPU_DOCKERFILE) if instr == "RUN"]
    assert runs, "no RUN instruction found"
    for run in runs:
        assert not re.search(r"\b(torch|triton)\b", run), f"torch in the CPU image: {run}"
        for command in re.split(r"&&|;", run):
            if re.search(r"\bpip install\b", command) and " -r " not in command:
                # Installing the package itself with its dependencies would pull torch from pyproject.
                assert "--no-deps" in command, f"pip install without --no-deps: {command.strip()}"
    names = {_requirement_name(line) for line in CPU_REQUIREMENTS.read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert not names & TORCH_PACKAGES


def test_cpu_requirements_are_the_pyproject_dependencies_without_torch() -> None:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {_normalized(d) for d in deps if _requirement_name(d) not in TORCH_PACKAGES}
    listed = {_normalized(line) for line in CPU_REQUIREMENTS.read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert listed == expected, "gateway/requirements-cpu.txt must track pyproject's dependencies minus torch"


def test_the_engine_image_installs_torch() -> None:
    runs = " ".join(args for instr, args in _dockerfile_instructions(ENGINE_DOCKERFILE) if instr == "RUN")
    assert re.search(r"pip install .*TORCH_SPEC", runs)
    args = dict(a.split("=", 1) for instr, a in _dockerfile_instructions(ENGINE_DOCKERFILE) if instr == "ARG")
    assert args["TORCH_SPEC"].strip('"').startswith("torch")


def test_the_engine_image_pins_the_torch_the_readme_installs() -> None:
    args = dict(a.split("=", 1) for instr, a in _dockerfile_instructions(ENGINE_DOCKERFILE) if instr == "ARG")
    pin = re.fullmatch(r"torch==(\d+\.\d+\.\d+)", args["TORCH_SPEC"].strip('"'))
    assert pin, f"TORCH_SPEC must pin one torch version, got {args['TORCH_SPEC']}"
    readme = (REPO_ROOT / "README.md").read_text()
    assert set(re.findall(r"pip install torch==(\S+) ", readme)) == {pin.group(1)}


def test_the_gateway_package_never_imports_torch() -> None:
    for path in (REPO_ROOT / "gateway").rglob("*.py"):
        assert not re.search(r"^\s*(import torch|from torch)\b", path.read_text(), re.M), path


def test_dockerfile_copy_sources_exist():
    """Every file a Dockerfile COPYs from the build context (the repo root) is in the repo."""
    for dockerfile in (CPU_DOCKERFILE, ENGINE_DOCKERFILE):
        for line in (REPO_ROOT / dockerfile).read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
                for src in parts[1:-1]:
                    assert (REPO_ROOT / src).exists(), f"{dockerfile}: COPY {src} is not in the repo"
