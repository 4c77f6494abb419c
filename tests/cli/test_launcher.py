"""The launcher against fake services: tiny grpc.health.v1 servers that the tests control.

The launcher builds the real service argvs (service_commands) and a wrap hook swaps each for the fake, keeping
its --port, so the launcher probes exactly the ports the real commands would use.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.cli.launcher import (Launcher, LauncherConfig, ServiceSpec, StartupError, run_stack, services_for)
from gateway.cli.restart_budget import RestartBudget
from gateway.cli.service_commands import local_topology

REPO_ROOT = Path(__file__).resolve().parents[2]

FAKE_SERVICE = r'''
import argparse, os, signal, sys, threading, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--port", type=int, required=True)
p.add_argument("--state-dir", required=True)
p.add_argument("--serving-after", type=float, default=0.0)   # NOT_SERVING until then
p.add_argument("--exit-after", type=float)                    # then exit with --exit-code, saying why
p.add_argument("--exit-code", type=int, default=3)
p.add_argument("--ignore-sigterm", action="store_true")
a = p.parse_args()
state = lambda suffix: os.path.join(a.state_dir, f"{a.name}.{suffix}")
with open(state("pid"), "w") as f:
    f.write(str(os.getpid()))

def die():
    print(f"fatal: {a.name} could not load the model (fake failure)", file=sys.stderr, flush=True)
    os._exit(a.exit_code)

if a.exit_after == 0:
    die()
stop = threading.Event()
signal.signal(signal.SIGTERM, signal.SIG_IGN if a.ignore_sigterm else (lambda *_: stop.set()))
servicer = health.HealthServicer()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port(f"127.0.0.1:{a.port}")
servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
server.start()
print(f"{a.name} listening on 127.0.0.1:{a.port}", file=sys.stderr, flush=True)
started = time.monotonic()
serving = False
while not stop.wait(0.02):
    elapsed = time.monotonic() - started
    if not serving and elapsed >= a.serving_after:
        open(state("serving"), "w").close()  # written before the flip: a launcher that saw SERVING sees it
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        serving = True
    if a.exit_after is not None and elapsed >= a.exit_after:
        die()
print(f"{a.name} stopping on SIGTERM", file=sys.stderr, flush=True)
server.stop(0)
'''

# Runs the launcher as its own process, so the tests can signal it the way a terminal or an OOM killer would.
DRIVER = r'''
import json, sys
from gateway.cli.launcher import LauncherConfig, run_stack
from gateway.cli.service_commands import local_topology
cfg = json.loads(sys.argv[1])
topology = local_topology("/models/fake.gguf", gateway_host="127.0.0.1", **cfg["ports"])
def wrap(name, argv):
    port = argv[argv.index("--port") + 1]
    return [sys.executable, cfg["fake"], "--name", name, "--port", port, "--state-dir", cfg["state"],
            *cfg["behave"].get(name, [])]
sys.exit(run_stack(topology, LauncherConfig(**cfg["launcher"]), wrap=wrap))
'''

FAST = dict(start_timeout_s=15.0, poll_interval_s=0.05, health_timeout_s=0.5, stop_grace_s=3.0)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (an orphan's zombie may linger if init does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _wait_dead(pids, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


class Stack:
    """Paths and ports for one fake stack."""

    def __init__(self, tmp_path: Path) -> None:
        self.fake = tmp_path / "fake_service.py"
        self.fake.write_text(FAKE_SERVICE)
        self.state = tmp_path / "state"
        self.state.mkdir()
        gw, tok, eng = _free_ports(3)
        self.ports = dict(gateway_port=gw, tokenizer_port=tok, engine_port=eng)
        self.topology = local_topology("/models/fake.gguf", gateway_host="127.0.0.1", **self.ports)
        self.drivers: list[subprocess.Popen] = []

    def cleanup(self) -> None:
        """After a failed test: leave no launcher or fake service behind."""
        for driver in self.drivers:
            if driver.poll() is None:
                driver.kill()
                driver.wait(5)
        for pid in self.pids().values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def wrap(self, behave: dict[str, list[str]] | None = None):
        behave = behave or {}

        def wrap(name: str, argv: list[str]) -> list[str]:
            port = argv[argv.index("--port") + 1]
            return [sys.executable, str(self.fake), "--name", name, "--port", port, "--state-dir",
                    str(self.state), *behave.get(name, [])]

        return wrap

    def pids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in self.state.glob("*.pid")}

    def spawn_driver(self, behave: dict[str, list[str]] | None = None, **launcher) -> subprocess.Popen:
        cfg = dict(fake=str(self.fake), state=str(self.state), ports=self.ports, behave=behave or {},
                   launcher={**FAST, **launcher})
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(cfg)], cwd=REPO_ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.drivers.append(driver)
        return driver


def _read_until(proc: subprocess.Popen, needle: str, timeout: float = 15.0) -> str:
    """Collects the driver's stderr until a line contains needle; fails with what was seen."""
    seen: list[str] = []
    done = threading.Event()

    def pump() -> None:
        for line in proc.stderr:
            seen.append(line)
            if needle in line:
                done.set()
                return
        done.set()

    threading.Thread(target=pump, daemon=True).start()
    if not done.wait(timeout) or not any(needle in line for line in seen):
        proc.kill()
        pytest.fail(f"launcher never printed {needle!r}; output:\n{''.join(seen)}")
    return "".join(seen)


@pytest.fixture
def stack(tmp_path: Path):
    s = Stack(tmp_path)
    yield s
    s.cleanup()


def test_waits_for_serving_and_starts_gateway_after_internal_services(stack: Stack) -> None:
    out = io.StringIO()
    launcher = Launcher(services_for(stack.topology, stack.wrap({"engine": ["--serving-after", "1.0"]})),
                        LauncherConfig(**FAST), out)
    try:
        assert launcher.start() is True
        # The engine writes this file just before it flips to SERVING, so it exists once the launcher saw it.
        assert (stack.state / "engine.serving").exists()
        log = out.getvalue()
        assert log.index("engine is SERVING") < log.index("starting gateway")
        assert log.index("tokenizer is SERVING") < log.index("starting gateway")
        assert "gateway is SERVING" in log
        assert " engine | engine listening on 127.0.0.1:" in log  # child output is relayed with its name
    finally:
        launcher.shutdown()
    pids = stack.pids()
    assert set(pids) == {"tokenizer", "engine", "gateway"}
    assert _wait_dead(pids.values()) == []


def test_sigint_prints_address_then_stops_every_child(stack: Stack) -> None:
    driver = stack.spawn_driver()
    log = _read_until(driver, "Press Ctrl-C to stop.")
    port = stack.ports["gateway_port"]
    assert f"Tandem is serving on 127.0.0.1:{port}" in log
    assert (f"grpcurl -plaintext -d '{{\"prompt\":\"Hello\",\"params\":{{\"max_tokens\":32}}}}' localhost:{port} "
            f"tandem.v1.Generation/GenerateStream") in log
    pids = stack.pids()
    assert len(pids) == 3 and all(_alive(p) for p in pids.values())
    driver.send_signal(signal.SIGINT)
    assert driver.wait(10) == 0
    assert _wait_dead(pids.values()) == []


def test_a_second_signal_skips_the_grace(stack: Stack) -> None:
    driver = stack.spawn_driver({"engine": ["--ignore-sigterm"]}, stop_grace_s=30.0)
    _read_until(driver, "Press Ctrl-C to stop.")
    pids = stack.pids()
    driver.send_signal(signal.SIGTERM)
    _read_until(driver, "stopping tokenizer, engine")
    started = time.monotonic()
    driver.send_signal(signal.SIGINT)
    assert driver.wait(10) == 0
    assert time.monotonic() - started < 5  # far less than the 30 s grace the stubborn engine would get
    assert _wait_dead(pids.values()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_children_die_when_the_launcher_is_killed(stack: Stack) -> None:
    driver = stack.spawn_driver()
    _read_until(driver, "Press Ctrl-C to stop.")
    pids = stack.pids()
    driver.kill()  # SIGKILL: the launcher gets no chance to clean up
    driver.wait(5)
    assert _wait_dead(pids.values()) == []


def test_exit_during_startup_reports_the_stderr_tail(stack: Stack) -> None:
    out = io.StringIO()
    code = run_stack(stack.topology, LauncherConfig(**FAST),
                     wrap=stack.wrap({"engine": ["--exit-after", "0", "--exit-code", "3"]}), out=out)
    log = out.getvalue()
    assert code == 1
    assert "ERROR tandem: engine exited with code 3 during start-up" in log
    # The cause, quoted in the error itself (not only in the relayed stream).
    error = log[log.index("ERROR tandem: engine exited"):]
    assert "fatal: engine could not load the model (fake failure)" in error
    assert "starting gateway" not in log
    assert _wait_dead(stack.pids().values()) == []


def test_crash_after_start_shuts_everything_down_without_restarts(stack: Stack) -> None:
    out = io.StringIO()
    code = run_stack(stack.topology, LauncherConfig(**FAST, max_restarts=0),
                     wrap=stack.wrap({"tokenizer": ["--exit-after", "1.5", "--exit-code", "7"]}), out=out)
    log = out.getvalue()
    assert code == 1
    assert log.index("Press Ctrl-C to stop.") < log.index("tokenizer exited with code 7")
    assert "fatal: tokenizer could not load the model" in log[log.index("tokenizer exited with code 7"):]
    assert _wait_dead(stack.pids().values()) == []


def test_a_crashed_service_is_restarted_until_its_restarts_run_out(stack: Stack) -> None:
    """The fake tokenizer crashes 1.5 s after each start: restarted twice (after 0.1 s, then 0.2 s), each time
    back to SERVING on the same port, then the third crash stops the stack."""
    out = io.StringIO()
    code = run_stack(stack.topology, LauncherConfig(**FAST, max_restarts=2, restart_backoff_s=0.1),
                     wrap=stack.wrap({"tokenizer": ["--exit-after", "1.5", "--exit-code", "7"]}), out=out)
    log = out.getvalue()
    assert code == 1
    assert log.count("starting tokenizer") == 3 and log.count("starting engine") == 1
    assert log.count("starting gateway") == 1
    first = log.index("restarting it in 0.1 s (restart 1 of 2 within 300 s)")
    second = log.index("in 0.2 s (restart 2 of 2 within 300 s)")
    assert log.index("Press Ctrl-C to stop.") < first < second
    assert log.count("tokenizer is SERVING") == 3
    assert "tokenizer exited with code 7 (crashed) after 2 restarts within 300 s; shutting down" in log
    assert _wait_dead(stack.pids().values()) == []


def test_a_restarted_service_keeps_the_stack_up(stack: Stack) -> None:
    """One crash of the engine: it is restarted and the stack keeps running until Ctrl-C (exit 0)."""
    driver = stack.spawn_driver({"engine": ["--exit-after", "1.0"]}, max_restarts=1, restart_backoff_s=0.1)
    seen = _read_until(driver, "restarting it in 0.1 s (restart 1 of 1 within 300 s)")
    assert "engine exited with code 3" in seen
    first_pid = stack.pids()["engine"]
    _read_until(driver, "engine is SERVING")
    assert stack.pids()["engine"] != first_pid         # a new process, started after the crash
    driver.send_signal(signal.SIGINT)
    driver.wait(15)
    assert _wait_dead(stack.pids().values()) == []


def test_crashes_further_apart_than_the_window_never_use_the_restarts_up(stack: Stack) -> None:
    """One restart allowed per 1 s window; the engine crashes 1.5 s after each start, so each earlier restart has
    left the window by the next crash: restarted again and again, each time after the base backoff."""
    driver = stack.spawn_driver({"engine": ["--exit-after", "1.5"]}, max_restarts=1, restart_window_s=1.0,
                                restart_backoff_s=0.1)
    for _ in range(3):
        _read_until(driver, "engine exited with code 3 (crashed); restarting it in 0.1 s (restart 1 of 1 within 1 s)")
    assert driver.poll() is None       # still supervising after three crashes with a budget of one
    driver.send_signal(signal.SIGINT)
    assert driver.wait(15) == 0
    assert _wait_dead(stack.pids().values()) == []


def test_the_restart_budget_counts_within_a_sliding_window() -> None:
    budget = RestartBudget(limit=2, window_s=10.0, backoff_s=1.0)
    assert [budget.take(t) for t in (0.0, 1.0)] == [1.0, 2.0]   # doubling inside the window
    assert budget.take(2.0) is None                             # a third restart within 10 s: stay down
    assert budget.take(9.9) is None
    # 10 s after the first restart it has left the window: one restart inside it, so one more is allowed.
    assert budget.take(10.0) == 2.0
    assert budget.recent(10.0) == 2


def test_the_restart_budget_never_runs_out_for_crashes_days_apart() -> None:
    budget = RestartBudget(limit=3, window_s=300.0, backoff_s=1.0)
    day = 86400.0
    assert [budget.take(k * day) for k in range(10)] == [1.0] * 10


def test_the_backoff_is_back_at_its_base_after_a_healthy_period() -> None:
    budget = RestartBudget(limit=5, window_s=60.0, backoff_s=0.5)
    assert [budget.take(t) for t in (0.0, 2.0, 5.0)] == [0.5, 1.0, 2.0]
    # Restarted at 5 s, then up longer than the window: every earlier restart is outside it.
    assert budget.take(5.0 + 60.0 + 1.0) == 0.5
    assert budget.take(70.0) == 1.0


def test_no_restarts_means_the_first_crash_stops_the_stack() -> None:
    assert RestartBudget(limit=0, window_s=300.0, backoff_s=1.0).take(0.0) is None


def test_startup_timeout_names_the_slow_service(stack: Stack) -> None:
    out = io.StringIO()
    code = run_stack(stack.topology, LauncherConfig(**{**FAST, "start_timeout_s": 1.0}),
                     wrap=stack.wrap({"engine": ["--serving-after", "60"]}), out=out)
    log = out.getvalue()
    assert code == 1
    assert "start-up timed out after 1 s waiting for engine to report SERVING" in log
    assert "last health: NOT_SERVING" in log
    assert _wait_dead(stack.pids().values()) == []


def test_a_child_ignoring_sigterm_is_killed_after_the_grace(stack: Stack) -> None:
    out = io.StringIO()
    launcher = Launcher(services_for(stack.topology, stack.wrap({"engine": ["--ignore-sigterm"]})),
                        LauncherConfig(**{**FAST, "stop_grace_s": 0.5}), out)
    try:
        assert launcher.start()
    finally:
        launcher.shutdown()
    assert "engine did not stop within 0.5 s; killing it" in out.getvalue()
    assert "tokenizer stopping on SIGTERM" in out.getvalue()
    assert _wait_dead(stack.pids().values()) == []


def test_a_taken_port_fails_before_anything_starts(stack: Stack) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", stack.ports["engine_port"]))
        squatter.listen()
        launcher = Launcher(services_for(stack.topology, stack.wrap()), LauncherConfig(**FAST), io.StringIO())
        with pytest.raises(StartupError, match=rf"engine: port 127.0.0.1:{stack.ports['engine_port']} is already"):
            launcher.start()
    assert launcher.processes == {}


def test_health_address_reaches_a_wildcard_bind_over_loopback() -> None:
    spec = lambda host: ServiceSpec("x", ("true",), host, 50051, 0)  # noqa: E731
    assert spec("0.0.0.0").health_address == "127.0.0.1:50051"
    assert spec("::").health_address == "[::1]:50051"
    assert spec("10.0.0.5").health_address == "10.0.0.5:50051"


def test_services_for_keeps_the_real_argvs_and_stages() -> None:
    specs = services_for(local_topology("/m.gguf"))
    assert [(s.name, s.stage, s.port) for s in specs] == [("tokenizer", 0, 50052), ("engine", 0, 50053),
                                                           ("gateway", 1, 50051)]
    assert specs[2].argv[1:] == ("-m", "gateway", "--host", "127.0.0.1", "--port", "50051",
                                 "--tokenizer", "127.0.0.1:50052", "--engine", "127.0.0.1:50053")


@pytest.mark.parametrize("bad", [dict(start_timeout_s=0), dict(stop_grace_s=-1), dict(tail_lines=0),
                                 dict(poll_interval_s=True), dict(restart_window_s=0), dict(max_restarts=-1)])
def test_launcher_config_is_validated(bad) -> None:
    with pytest.raises(ValueError):
        LauncherConfig(**bad)
