"""Starts the three Tandem services, waits until each is SERVING, supervises them, and stops them cleanly.

Order: the tokenizer and engine start together; the gateway starts once both report SERVING over
grpc.health.v1, because it dials them at start-up. A service that exits during start-up, or a start-up that
runs past the timeout, stops everything and is reported with the tail of that service's output. After start-up,
a service that exits is reported with its output's tail and restarted in place (same argv and port), after a
backoff that doubles with each recent restart of that service, and supervision goes on once it is SERVING again;
the gateway re-dials a restarted backend by itself. A crash that would be the service's restart number
`max_restarts + 1` within `restart_window_s` seconds, or a restart that does not come up, shuts everything down
(restart_budget.py). Ctrl-C, SIGTERM or SIGHUP stop the services in reverse start order: SIGTERM to each process
group, then SIGKILL after a grace period; a second signal skips the grace.
"""
from __future__ import annotations

import errno
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TextIO

from gateway.cli import healthcheck
from gateway.cli.restart_budget import RestartBudget
from gateway.cli.service_commands import ENGINE, GATEWAY, TOKENIZER, ServiceTopology, listen_addresses, service_argvs
from gateway.cli.service_process import NAME_WIDTH, ServiceProcess
from protos.service_logging import text_line

# Stage of each service: a stage starts only when every service of the previous stages is SERVING. Engine
# replicas past the first (engine-2, ...) share the engine's stage.
_STAGES = {TOKENIZER: 0, ENGINE: 0, GATEWAY: 1}
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StartupError(RuntimeError):
    """A service could not be brought to SERVING; the message says which one and why."""


@dataclass(frozen=True)
class LauncherConfig:
    start_timeout_s: float = 300.0   # engine load (weights, KV cache, CUDA graphs) can take minutes
    poll_interval_s: float = 0.25
    health_timeout_s: float = 1.0    # one health RPC; the poll loop retries until start_timeout_s
    stop_grace_s: float = 10.0       # SIGTERM to SIGKILL
    tail_lines: int = 40             # output lines quoted when a service fails
    max_restarts: int = 3            # per service within restart_window_s; 0: a crash shuts everything down
    restart_window_s: float = 300.0  # the sliding window max_restarts counts over
    restart_backoff_s: float = 1.0   # before a restart with none other in the window; doubled for each one there

    def __post_init__(self) -> None:
        for name in ("start_timeout_s", "poll_interval_s", "health_timeout_s", "stop_grace_s", "restart_window_s",
                     "restart_backoff_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.tail_lines, int) or self.tail_lines < 1:
            raise ValueError(f"tail_lines must be a positive integer, got {self.tail_lines!r}")
        if not isinstance(self.max_restarts, int) or isinstance(self.max_restarts, bool) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be a non-negative integer, got {self.max_restarts!r}")


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: tuple[str, ...]
    listen_host: str
    port: int
    stage: int
    tls_roots: bytes | None = None         # the health probe speaks TLS trusting these PEM roots
    tls_server_name: str | None = None

    @property
    def health_address(self) -> str:
        """Where the launcher probes health: a wildcard bind is reached over loopback."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(self.listen_host, self.listen_host)
        return f"[{host}]:{self.port}" if ":" in host and not host.startswith("[") else f"{host}:{self.port}"


# Maps (service name, argv from service_commands) to the argv actually run; tests use it to run fake services.
CommandWrap = Callable[[str, list[str]], list[str]]


def services_for(topology: ServiceTopology, wrap: CommandWrap | None = None) -> list[ServiceSpec]:
    argvs = service_argvs(topology)
    listens = listen_addresses(topology)
    specs = []
    for name, argv in argvs.items():
        host, port = listens[name]
        tls = _gateway_probe_tls(topology) if name == GATEWAY else {}
        specs.append(ServiceSpec(name=name, argv=tuple(wrap(name, argv) if wrap else argv),
                                 listen_host=host, port=port, stage=_STAGES.get(name, _STAGES[ENGINE]), **tls))
    return specs


def _gateway_probe_tls(topology: ServiceTopology) -> dict:
    if not topology.gateway_tls_cert:
        return {}
    roots = topology.gateway_tls_ca or topology.gateway_tls_cert
    try:
        with open(roots, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"TLS roots for the gateway health probe: cannot read {roots}: {e.strerror}") from None
    return {"tls_roots": pem, "tls_server_name": topology.gateway_tls_server_name}


def ensure_ports_free(specs: Sequence[ServiceSpec]) -> None:
    """Fails early when a port is taken. This matters beyond a nicer message: gRPC servers bind with
    SO_REUSEPORT, so a new service can bind beside a stale one and the health probe may answer from the stale."""
    for spec in specs:
        family = socket.AF_INET6 if ":" in spec.listen_host.strip("[]") else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # SO_REUSEADDR ignores TIME_WAIT leftovers but still fails on a listening socket.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((spec.listen_host.strip("[]"), spec.port))
            except OSError as err:
                why = "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err})"
                raise StartupError(f"{spec.name}: port {spec.listen_host}:{spec.port} {why}; stop whatever "
                                   f"holds it or choose another port") from None


class Launcher:
    """Runs a set of services. Every method must be called from the same, long-lived thread (see
    service_process: the parent-death signal follows the thread that spawned the child)."""

    def __init__(self, specs: Sequence[ServiceSpec], config: LauncherConfig = LauncherConfig(),
                 out: TextIO | None = None) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"service names must be unique, got {names}")
        self.specs = list(specs)
        self.config = config
        self._out = sys.stderr if out is None else out
        self._out_lock = threading.Lock()
        self.processes: dict[str, ServiceProcess] = {}
        self.restart_budgets = {name: RestartBudget(config.max_restarts, config.restart_window_s,
                                                    config.restart_backoff_s) for name in names}
        # Stop requests are counted in a plain int, not a threading.Event: a signal handler runs on the main
        # thread between bytecodes, possibly while that thread holds the very lock Event.set() would take, so
        # the handler must take no lock at all. The loops poll this counter. Two or more: skip the grace.
        self._stop_requests = 0
        self._stop_signal: int | None = None

    # -- output ------------------------------------------------------------------------------------------------

    def say(self, message: str, level: str = "INFO") -> None:
        prefix = f"{'tandem':>{NAME_WIDTH}} | "
        text = "".join(prefix + text_line("tandem", level, line) + "\n" for line in message.splitlines() or [""])
        with self._out_lock:
            self._out.write(text)
            self._out.flush()

    # -- start-up ----------------------------------------------------------------------------------------------

    def start(self) -> bool:
        """Starts the services stage by stage and waits for SERVING. Returns False when a stop was requested
        before everything was up; raises StartupError when a service fails. The caller shuts down either way."""
        ensure_ports_free(self.specs)
        deadline = time.monotonic() + self.config.start_timeout_s
        started = time.monotonic()
        for stage in sorted({s.stage for s in self.specs}):
            batch = [s for s in self.specs if s.stage == stage]
            for spec in batch:  # spawned from this thread, all at once: the batch starts in parallel
                self._spawn(spec)
            if not self._wait_serving(batch, deadline, started):
                return False
        return True

    def _spawn(self, spec: ServiceSpec) -> None:
        self.say(f"starting {spec.name}: {' '.join(spec.argv)}")
        self.processes[spec.name] = ServiceProcess(spec.name, spec.argv, self._out, self._out_lock,
                                                   self.config.tail_lines)

    def _wait_serving(self, batch: Sequence[ServiceSpec], deadline: float, started: float) -> bool:
        channels = {s.name: healthcheck.open_channel(s.health_address, s.tls_roots, s.tls_server_name)
                    for s in batch}
        last_status = {s.name: "not probed yet" for s in batch}
        pending = [s.name for s in batch]
        try:
            while pending:
                for name in list(pending):
                    proc = self.processes[name]
                    code = proc.poll()
                    if code is not None:
                        raise StartupError(f"{name} exited with code {code} during start-up "
                                           f"({self._describe(code)}). Its last output:\n{proc.tail()}")
                    status = healthcheck.check(channels[name], self.config.health_timeout_s)
                    last_status[name] = status
                    if status == "SERVING":
                        pending.remove(name)
                        self.say(f"{name} is SERVING ({time.monotonic() - started:.1f} s)")
                if not pending:
                    break
                if time.monotonic() >= deadline:
                    details = "\n".join(f"{n} (last health: {last_status[n]}); its last output:\n"
                                        f"{self.processes[n].tail()}" for n in pending)
                    raise StartupError(f"start-up timed out after {self.config.start_timeout_s:g} s waiting "
                                       f"for {', '.join(pending)} to report SERVING:\n{details}")
                if self._sleep_unless_stopped(self.config.poll_interval_s):
                    return False
            return True
        finally:
            for channel in channels.values():
                channel.close()

    # -- running -----------------------------------------------------------------------------------------------

    def supervise(self) -> int:
        """Blocks until a stop is requested (returns 0) or a service exits for good (returns 1)."""
        while not self._sleep_unless_stopped(self.config.poll_interval_s):
            for name, proc in list(self.processes.items()):
                code = proc.poll()
                if code is not None:
                    verdict = self._on_service_exit(name, code)
                    if verdict is not None:
                        return verdict
        return 0

    def _on_service_exit(self, name: str, code: int) -> int | None:
        """A service died after start-up: restart it (None: keep supervising), or shut down (1) once its restarts
        within the window are used up or its restart fails. 0 when a stop was requested meanwhile."""
        tail = self.processes[name].tail()
        budget = self.restart_budgets[name]
        now = time.monotonic()
        window = f"{self.config.restart_window_s:g} s"
        backoff = budget.take(now)
        if backoff is None:
            done = budget.recent(now)
            limit = f" after {done} restart{'s' if done != 1 else ''} within {window}" if done else ""
            self.say(f"{name} exited with code {code} ({self._describe(code)}){limit}; shutting down. "
                     f"Its last output:\n{tail}", "ERROR")
            return 1
        self.say(f"{name} exited with code {code} ({self._describe(code)}); restarting it in {backoff:g} s "
                 f"(restart {budget.recent(now)} of {self.config.max_restarts} within {window}). "
                 f"Its last output:\n{tail}", "WARNING")
        if self._sleep_unless_stopped(backoff):
            return 0
        spec = next(s for s in self.specs if s.name == name)
        self._spawn(spec)
        try:
            started = time.monotonic()
            if not self._wait_serving([spec], started + self.config.start_timeout_s, started):
                return 0
        except StartupError as err:
            self.say(f"restarting {name} failed: {err}", "ERROR")
            return 1
        return None

    @staticmethod
    def _describe(code: int) -> str:
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return "crashed" if code else "exited cleanly, which a service should not do on its own"

    # -- shutdown ----------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stops the running services in reverse start order: SIGTERM, wait, SIGKILL. Idempotent."""
        for stage in sorted({s.stage for s in self.specs}, reverse=True):
            procs = [self.processes[s.name] for s in self.specs if s.stage == stage and s.name in self.processes]
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                continue
            self.say(f"stopping {', '.join(p.name for p in alive)}")
            for proc in alive:
                proc.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_grace_s
            while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
                if self._stop_requests > 1:
                    break
                time.sleep(0.05)
            for proc in alive:
                if proc.poll() is None:
                    self.say(f"{proc.name} did not stop within {self.config.stop_grace_s:g} s; killing it", "WARNING")
                    proc.signal_group(signal.SIGKILL)
                    proc.wait(5.0)

    # -- signals -----------------------------------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop_requests > 0

    def request_stop(self) -> None:
        """Safe from a signal handler or another thread: one int update, no lock, no I/O."""
        self._stop_requests += 1

    def _on_signal(self, signum: int, _frame) -> None:
        self._stop_signal = signum
        self.request_stop()

    def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleeps up to `seconds`; True (after saying why) once a stop was requested."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if self.stop_requested:
            why = signal.Signals(self._stop_signal).name if self._stop_signal else "stop requested"
            self.say(f"{why}: stopping (again to stop at once)")
            return True
        return False

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """start + supervise + shutdown, with stop signals handled. Returns the process exit status."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            try:
                ready = self.start()
            except StartupError as err:
                self.say(str(err), "ERROR")
                return 1
            if not ready:
                return 0
            if on_ready:
                on_ready()
            return self.supervise()
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def ready_banner(topology: ServiceTopology) -> str:
    host = topology.gateway_host
    local = "localhost" if host in ("0.0.0.0", "::", "[::]", "127.0.0.1") else host
    address = f"{local}:{topology.gateway_port}"
    grpcurl_tls = f"-cacert {topology.gateway_tls_ca or topology.gateway_tls_cert}" if topology.gateway_tls_cert \
        else "-plaintext"
    generate_tls = f" --tls-ca {topology.gateway_tls_ca or topology.gateway_tls_cert}" \
        if topology.gateway_tls_cert else ""
    return (f"Tandem is serving on {host}:{topology.gateway_port} (model: {topology.model_path})\n"
            f"Try it:\n"
            f"  grpcurl {grpcurl_tls} -d '{{\"prompt\":\"Hello\",\"params\":{{\"max_tokens\":32}}}}' {address} "
            f"tandem.v1.Generation/GenerateStream\n"
            f"  tandem generate \"Hello\" --max-tokens 32 --address {address}{generate_tls}\n"
            + (_http_banner(topology, local) if topology.http_port else "")
            + "Press Ctrl-C to stop.")


def _http_banner(topology: ServiceTopology, local: str) -> str:
    scheme = "https" if topology.gateway_tls_cert else "http"
    base = f"{scheme}://{local}:{topology.http_port}"
    return (f"OpenAI-compatible HTTP API: {base}/v1 (set it as the openai client's base_url)\n"
            f"  curl {base}/v1/completions -H 'Content-Type: application/json' "
            f"-d '{{\"prompt\":\"Hello\",\"max_tokens\":32}}'\n")


def run_stack(topology: ServiceTopology, config: LauncherConfig = LauncherConfig(),
              wrap: CommandWrap | None = None, out: TextIO | None = None) -> int:
    """What `tandem serve` runs: the three services of `topology`, until a signal or a crash."""
    launcher = Launcher(services_for(topology, wrap), config, out)
    return launcher.run(on_ready=lambda: launcher.say(ready_banner(topology)))
