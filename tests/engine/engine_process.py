"""What the fault tests of tensor and pipeline parallelism share: an engine whose worker is killed mid-run, and an
engine service started as its own process, with its worker processes found by psutil."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from engine_svc.executor.multiproc import MultiprocExecutor
from tests.e2e.conftest import free_port

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def kill_a_worker_mid_run(config: EngineConfig) -> tuple[list[str], BaseException]:
    """Runs requests on an engine over worker processes, SIGKILLs the first worker, and returns the monitor's
    reports (it must report within 10 s) and what the next step raised (it must fail within 25 s, not hang)."""
    reports: list[str] = []
    reported = threading.Event()
    executor = MultiprocExecutor(config, on_failure=lambda m: (reports.append(m), reported.set()))
    engine = Engine(executor.driver.config, executor)
    try:
        assert [len(out) for out in engine.generate([[5, 6, 7], [8, 9]], GREEDY)] == [4, 4]
        os.kill(executor.workers[0].pid, signal.SIGKILL)
        assert reported.wait(10), "the monitor did not report the dead worker"
        engine.add_request("after", [5, 6, 7], GREEDY)
        failure: list[BaseException] = []
        stepping = threading.Thread(target=lambda: _capture(engine.step, failure), daemon=True)
        stepping.start()
        stepping.join(25)
        assert not stepping.is_alive(), "a step on a dead rank hung"
        assert failure, "a step on a dead rank succeeded"
        return reports, failure[0]
    finally:
        engine.shutdown()


def _capture(fn, into: list) -> None:
    try:
        fn()
    except BaseException as e:   # noqa: BLE001 - the caller inspects it
        into.append(e)


def exit_code_within(proc: subprocess.Popen, seconds: float) -> int:
    """The engine's exit code; fails the test (killing it) when it is still running after `seconds`."""
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the engine did not exit within {seconds} s of a worker's death")


def start_engine_service(model, log, parallel_args: list[str], num_workers: int, port: int | None = None
                         ) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """`python -m engine_svc` on a tiny checkpoint (CPU, fp32) with parallel_args, on port (default: a free one);
    waits until it listens and returns it with its num_workers worker processes, in rank order."""
    cmd = [sys.executable, "-m", "engine_svc", "--model", str(model), "--device", "cpu", "--dtype", "float32",
           "--num-kv-blocks", "32", *parallel_args, "--port", str(port or free_port())]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while "engine: listening on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the engine did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == num_workers
    return proc, sorted(workers, key=lambda w: w.create_time())
