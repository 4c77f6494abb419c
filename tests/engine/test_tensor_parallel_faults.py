"""Tensor-parallel failures are loud and leave nothing behind: a worker killed mid-run is reported by rank and
cause and fails the engine's next step instead of hanging; the engine service exits non-zero naming the rank, and
neither that nor a SIGKILLed engine leaves worker processes behind."""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import psutil
import pytest

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from engine_svc.executor.multiproc import MultiprocExecutor
from tests.engine.engine_process import start_engine_service
from tests.engine.tiny_models import write_tiny_family

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 3 K/V heads: splits over 2 or 3 ranks.
    return write_tiny_family(tmp_path_factory.mktemp("tp-faults"), "llama", num_attention_heads=6,
                             num_key_value_heads=3, hidden_size=96)


def test_a_killed_worker_is_reported_by_rank_and_fails_the_next_step(tiny):
    config = EngineConfig(model=str(tiny), device="cpu", dtype="float32", block_size=4, num_kv_blocks=32,
                          tensor_parallel_size=2, distributed_timeout_s=30)
    reports: list[str] = []
    reported = threading.Event()
    executor = MultiprocExecutor(config, on_failure=lambda m: (reports.append(m), reported.set()))
    engine = Engine(executor.driver.config, executor)
    try:
        assert len(engine.generate([[5, 6, 7]], GREEDY)[0]) == 4
        os.kill(executor.workers[0].pid, signal.SIGKILL)
        assert reported.wait(10)
        assert reports == ["[engine] tensor-parallel worker rank 1 died (killed by SIGKILL); the engine stops"]
        engine.add_request("after", [5, 6, 7], GREEDY)
        failure: list[BaseException] = []
        stepping = threading.Thread(target=lambda: _capture(engine.step, failure), daemon=True)
        stepping.start()
        stepping.join(25)
        assert not stepping.is_alive(), "a step on a dead rank hung"
        assert failure and isinstance(failure[0], RuntimeError)
    finally:
        engine.shutdown()


def _capture(fn, into: list) -> None:
    try:
        fn()
    except BaseException as e:   # noqa: BLE001 - the test inspects it
        into.append(e)


def _start_engine(tiny, log) -> tuple[subprocess.Popen, list[psutil.Process]]:
    return start_engine_service(tiny, log, ["--tensor-parallel-size", "3"], num_workers=2)


def test_engine_exits_naming_the_dead_rank_and_leaves_no_workers(tiny, tmp_path):
    proc, workers = _start_engine(tiny, tmp_path / "engine.log")
    workers[1].send_signal(signal.SIGKILL)
    try:
        code = proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the engine did not exit within 10 s of a worker's death")
    assert code != 0
    rank = 1 + [w.pid for w in workers].index(workers[1].pid)
    assert f"tensor-parallel worker rank {rank} died (killed by SIGKILL)" in (tmp_path / "engine.log").read_text()
    _gone, alive = psutil.wait_procs([workers[0]], timeout=5)
    assert not alive, "a worker outlived its engine"


def test_a_sigkilled_engine_leaves_no_workers(tiny, tmp_path):
    proc, workers = _start_engine(tiny, tmp_path / "engine.log")
    proc.kill()
    proc.wait()
    _gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, "workers outlived their engine"
