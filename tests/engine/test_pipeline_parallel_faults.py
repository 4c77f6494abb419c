"""Pipeline-parallel failures are loud and leave nothing behind: a stage's worker killed mid-run is reported by
rank, stage and cause and fails the engine's next step instead of hanging; the engine service (2 stages of 2
tensor-parallel ranks) exits non-zero naming the rank, and no worker outlives it."""
from __future__ import annotations

import signal

import psutil
import pytest

from engine_svc.config import EngineConfig
from tests.engine.engine_process import exit_code_within, kill_a_worker_mid_run, start_engine_service
from tests.engine.tiny_models import write_tiny_family


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("pp-faults"), "llama")


def test_a_killed_stage_is_reported_by_rank_and_fails_the_next_step(tiny):
    config = EngineConfig(model=str(tiny), device="cpu", dtype="float32", block_size=4, num_kv_blocks=32,
                          pipeline_parallel_size=2, distributed_timeout_s=30)
    reports, failure = kill_a_worker_mid_run(config)
    assert reports == ["worker rank 1 (pipeline stage 0 of 2, tensor-parallel rank 0 of 1) died "
                       "(killed by SIGKILL); the engine stops"]
    assert isinstance(failure, RuntimeError)


def test_engine_exits_naming_the_dead_stage_rank_and_leaves_no_workers(tiny, tmp_path):
    log = tmp_path / "engine.log"
    proc, workers = start_engine_service(tiny, log, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"],
                                         num_workers=3)
    workers[1].send_signal(signal.SIGKILL)   # rank 2: stage 0's first tensor-parallel rank
    assert exit_code_within(proc, 10) != 0
    lines = [line.split(" ERROR engine: ")[-1] for line in log.read_text().splitlines() if "died" in line]
    assert lines == ["worker rank 2 (pipeline stage 0 of 2, tensor-parallel rank 0 of 2) died "
                     "(killed by SIGKILL); the engine stops"]
    _gone, alive = psutil.wait_procs([workers[0], workers[2]], timeout=5)
    assert not alive, "a worker outlived its engine"
