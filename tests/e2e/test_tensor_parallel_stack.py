"""The whole stack with a tensor-parallel engine: `tandem serve --device cpu --tensor-parallel-size 2` on SmolLM2
(9 query heads, 3 K/V heads: rank 0 caches 1 of them, rank 1 the other 2) gives, through the real grpcurl, the
same greedy tokens as the session's single-process stack. Then (last: it costs the engine a restart) kill -9 of a
worker mid-stream: the engine reports NOT_SERVING, the client's stream ends with UNAVAILABLE within 10 s, the
engine and its other worker are gone, and `tandem serve` restarts the engine, which serves the same tokens again.

One T=2 stack for the module, started once and shared by its tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import grpc
import psutil
import pytest

from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc
from tests.e2e.conftest import _serving, cpu_stack
from tests.e2e.test_grpcurl import run as grpcurl
from tests.engine.test_tensor_parallel_faults import watch_health

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def tp_stack(smollm2_gguf, tmp_path_factory):
    with cpu_stack(smollm2_gguf, tmp_path_factory.mktemp("tp-stack") / "serve.log",
                   ["--tensor-parallel-size", "2", "--max-restarts", "1"],
                   ["--num-kv-blocks", "256", "--max-num-seqs", "8", "--check-kv-integrity",
                    "--async-scheduling"]) as started:
        yield started


def greedy_ids(address: str, prompt: str) -> list[int]:
    body = json.dumps({"prompt": prompt, "params": {"max_tokens": 24, "temperature": 0, "ignore_eos": True}})
    return [int(t) for t in json.loads(grpcurl("-d", body, address, "tandem.v1.Generation/Generate"))["token_ids"]]


def engine_processes(launcher: subprocess.Popen) -> tuple[psutil.Process, list[psutil.Process]]:
    """The engine service under `tandem serve`, and its tensor-parallel worker processes."""
    engines = [p for p in psutil.Process(launcher.pid).children()
               if "engine_svc" in " ".join(p.cmdline())]
    assert len(engines) == 1, engines
    workers = [c for c in engines[0].children() if "spawn_main" in " ".join(c.cmdline())]
    return engines[0], workers


def test_greedy_tokens_through_grpcurl_equal_the_single_process_stack(stack, tp_stack):
    tp, launcher = tp_stack
    assert "(tensor-parallel rank 1 of 2)" in tp.log.read_text()
    assert len(engine_processes(launcher)[1]) == 1
    for prompt in PROMPTS:
        expected = greedy_ids(stack.address, prompt)
        assert len(expected) == 24
        assert greedy_ids(tp.address, prompt) == expected, prompt


def test_a_killed_worker_ends_the_stream_with_unavailable_and_the_engine_restarts(stack, tp_stack):
    tp, launcher = tp_stack
    engine, workers = engine_processes(launcher)
    health, watching = watch_health(tp.engine_address)
    assert watching.wait(10) and health == ["SERVING"]
    errors: list[grpc.RpcError] = []
    streaming, ended = threading.Event(), threading.Event()

    def stream() -> None:
        request = api.GenerateRequest(prompt="Once upon a time", params=api.GenerationParams(
            max_tokens=4000, temperature=0, ignore_eos=True))
        with grpc.insecure_channel(tp.address) as channel:
            try:
                for _ in generation_pb2_grpc.GenerationStub(channel).GenerateStream(request, timeout=120):
                    streaming.set()
            except grpc.RpcError as e:
                errors.append(e)
        ended.set()

    threading.Thread(target=stream, daemon=True).start()
    assert streaming.wait(60)
    os.kill(workers[0].pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert ended.wait(10), "the client's stream did not end within 10 s of the worker's death"
    assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors
    assert time.monotonic() - t0 < 10
    _, alive = psutil.wait_procs([engine, *workers], timeout=10)
    assert not alive, f"left behind: {alive}"
    assert health[:2] == ["SERVING", "NOT_SERVING"]   # reported before the engine's port closed

    deadline = time.monotonic() + 240   # the launcher restarts the engine (a second load of the model)
    while not _serving(tp.engine_address):
        assert launcher.poll() is None and time.monotonic() < deadline, tp.log.read_text()[-3000:]
        time.sleep(0.5)
    log = tp.log.read_text()
    assert "engine exited with code 1 (crashed); restarting it" in log
    assert "ERROR engine: tensor-parallel worker rank 1 died (killed by SIGKILL); the engine stops" in log
    restarted, new_workers = engine_processes(launcher)
    assert restarted.pid != engine.pid and len(new_workers) == 1
    assert greedy_ids(tp.address, PROMPTS[0]) == greedy_ids(stack.address, PROMPTS[0])
