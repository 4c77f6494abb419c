"""When the engine goes away, in-flight requests end with UNAVAILABLE (no hang), new ones fail fast, and the
gateway reconnects once the engine is back."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc
from tests.e2e.conftest import _serving, free_port


def start(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_serving(address: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not _serving(address):
        assert proc.poll() is None and time.monotonic() < deadline, f"{address} did not come up"
        time.sleep(0.3)


@pytest.fixture()
def services(smollm2_gguf, tmp_path):
    model = str(smollm2_gguf)
    tok_port, eng_port, gw_port = free_port(), free_port(), free_port()
    log = open(tmp_path / "services.log", "w")
    engine_args = ["engine_svc", "--model", model, "--port", str(eng_port), "--device", "cpu",
                   "--num-kv-blocks", "256"]
    procs = {
        "tokenizer": start(["tokenizer_svc", "--model", model, "--port", str(tok_port)], log),
        "engine": start(engine_args, log),
    }
    wait_serving(f"127.0.0.1:{tok_port}", procs["tokenizer"])
    wait_serving(f"127.0.0.1:{eng_port}", procs["engine"])
    procs["gateway"] = start(["gateway", "--host", "127.0.0.1", "--port", str(gw_port), "--engine",
                              f"127.0.0.1:{eng_port}", "--tokenizer", f"127.0.0.1:{tok_port}"], log)
    wait_serving(f"127.0.0.1:{gw_port}", procs["gateway"])

    def restart_engine() -> None:
        procs["engine"] = start(engine_args, log)
        wait_serving(f"127.0.0.1:{eng_port}", procs["engine"])

    yield f"127.0.0.1:{gw_port}", procs, restart_engine
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log.close()


def long_request() -> api.GenerateRequest:
    return api.GenerateRequest(prompt="Once upon a time", params=api.GenerationParams(max_tokens=4000,
                                                                                        temperature=0))


def test_engine_loss_ends_requests_with_unavailable_then_recovers(services):
    address, procs, restart_engine = services
    with grpc.insecure_channel(address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        stream = stub.GenerateStream(long_request(), timeout=60)
        next(stream)
        next(stream)
        os.killpg(procs["engine"].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert time.monotonic() - t0 < 10

        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(long_request(), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()

        restart_engine()
        resp = stub.Generate(api.GenerateRequest(prompt="Hello", params=api.GenerationParams(
            max_tokens=4, temperature=0)), timeout=60)
        assert len(resp.token_ids) == 4
