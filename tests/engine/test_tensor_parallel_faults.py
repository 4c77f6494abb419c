"""Tensor-parallel failures are loud and leave nothing behind: a worker killed mid-run is reported by rank and
cause and fails the engine's next step instead of hanging; the engine service reports NOT_SERVING on its health
service, then exits non-zero, its last line naming the rank, and neither that nor a SIGKILLed engine leaves worker
processes behind."""
from __future__ import annotations

import signal
import subprocess
import threading

import psutil
import pytest

from engine_svc.config import EngineConfig
from tests.e2e.conftest import free_port
from tests.engine.engine_process import exit_code_within, kill_a_worker_mid_run, start_engine_service
from tests.engine.tiny_models import write_tiny_family


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 3 K/V heads: splits over 2 or 3 ranks.
    return write_tiny_family(tmp_path_factory.mktemp("tp-faults"), "llama", num_attention_heads=6,
                             num_key_value_heads=3, hidden_size=96)


def test_a_killed_worker_is_reported_by_rank_and_fails_the_next_step(tiny):
    config = EngineConfig(model=str(tiny), device="cpu", dtype="float32", block_size=4, num_kv_blocks=32,
                          tensor_parallel_size=2, distributed_timeout_s=30)
    reports, failure = kill_a_worker_mid_run(config)
    assert reports == ["tensor-parallel worker rank 1 died (killed by SIGKILL); the engine stops"]
    assert isinstance(failure, RuntimeError)


def _start_engine(tiny, log, port: int | None = None) -> tuple[subprocess.Popen, list[psutil.Process]]:
    return start_engine_service(tiny, log, ["--tensor-parallel-size", "3"], num_workers=2, port=port)


def watch_health(address: str) -> tuple[list[str], threading.Event]:
    """Watches grpc.health.v1 on address from a thread: the statuses it reports, in order, and an event set once
    the watch has its first answer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    seen: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        with grpc.insecure_channel(address) as channel:
            try:
                for r in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="")):
                    seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
                    ready.set()
            except grpc.RpcError:
                pass

    threading.Thread(target=watch, daemon=True).start()
    return seen, ready


def test_engine_exits_naming_the_dead_rank_and_leaves_no_workers(tiny, tmp_path):
    port = free_port()
    proc, workers = _start_engine(tiny, tmp_path / "engine.log", port)
    health, watching = watch_health(f"127.0.0.1:{port}")
    assert watching.wait(10) and health == ["SERVING"]
    workers[1].send_signal(signal.SIGKILL)
    assert exit_code_within(proc, 10) != 0
    assert health == ["SERVING", "NOT_SERVING"]   # reported before the port closed
    last = (tmp_path / "engine.log").read_text().strip().splitlines()[-1]
    assert last.endswith(" ERROR engine: tensor-parallel worker rank 2 died (killed by SIGKILL); the engine stops")
    _gone, alive = psutil.wait_procs([workers[0]], timeout=5)
    assert not alive, "a worker outlived its engine"


def test_a_sigkilled_engine_leaves_no_workers(tiny, tmp_path):
    proc, workers = _start_engine(tiny, tmp_path / "engine.log")
    proc.kill()
    proc.wait()
    _gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, "workers outlived their engine"
