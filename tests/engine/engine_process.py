"""An engine service started as its own process for the fault tests, with its worker processes found by psutil."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from tests.e2e.conftest import free_port


def start_engine_service(model, log, parallel_args: list[str], num_workers: int
                         ) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """`python -m engine_svc` on a tiny checkpoint (CPU, fp32) with parallel_args; waits until it listens and
    returns it with its num_workers worker processes, in rank order."""
    cmd = [sys.executable, "-m", "engine_svc", "--model", str(model), "--device", "cpu", "--dtype", "float32",
           "--num-kv-blocks", "32", *parallel_args, "--port", str(free_port())]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while "engine_svc listening" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the engine did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == num_workers
    return proc, sorted(workers, key=lambda w: w.create_time())
