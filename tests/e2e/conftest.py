"""The whole stack on the real default model (SmolLM2-135M-Instruct GGUF), started once per session through
`tandem serve`, plus transformers on the same GGUF as the reference."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Stack:
    address: str
    engine_address: str
    tokenizer_address: str
    model_path: Path
    log: Path
    metrics_url: str = ""     # the gateway's Prometheus endpoint
    http_url: str = ""        # the gateway's OpenAI-compatible HTTP API (the openai client's base_url)


def _serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@contextlib.contextmanager
def serve_process(serve_args: list[str], address: str, log: Path):
    """`tandem serve SERVE_ARGS` in its own process group, output to `log`; yields the process once `address`
    reports SERVING. At exit, Ctrl-C must stop it cleanly within 30 s."""
    cmd = [sys.executable, "-c", "from gateway.cli.main import main; main()", "serve", *serve_args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _serving(address):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"tandem serve did not come up; log:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    yield proc
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("tandem serve did not stop within 30 s of Ctrl-C")
    assert proc.returncode == 0, log.read_text()[-4000:]


@contextlib.contextmanager
def cpu_stack(model: Path, log: Path, serve_options: list[str], engine_args: list[str],
              dtype: str | None = "float32"):
    """`tandem serve` of model on the CPU in dtype (fp32; None: the engine's default) on free loopback ports, with
    more serve options and engine arguments; yields (Stack, the serve process) once it is SERVING."""
    ports = [free_port() for _ in range(5)]
    address = f"127.0.0.1:{ports[0]}"
    args = ["--model", str(model), "--host", "127.0.0.1", "--port", str(ports[0]),
            "--tokenizer-port", str(ports[1]), "--engine-port", str(ports[2]),
            "--metrics-port", str(ports[3]), "--http-port", str(ports[4]), "--device", "cpu",
            *(["--dtype", dtype] if dtype else []), *serve_options, "--", *engine_args]
    with serve_process(args, address, log) as proc:
        yield Stack(address, f"127.0.0.1:{ports[2]}", f"127.0.0.1:{ports[1]}", model, log,
                    f"http://127.0.0.1:{ports[3]}/metrics", f"http://127.0.0.1:{ports[4]}/v1"), proc


@pytest.fixture(scope="session")
def stack(smollm2_gguf, tmp_path_factory):
    engine_args = ["--num-kv-blocks", "512", "--max-num-seqs", "32", "--max-waiting", "24",
                   # The GPU's default scheduling mode, so the whole suite runs it on the CPU too.
                   "--check-kv-integrity", "--async-scheduling"]
    with cpu_stack(smollm2_gguf, tmp_path_factory.mktemp("stack") / "serve.log", [], engine_args) as (s, _):
        yield s


@pytest.fixture(scope="session")
def hf_reference(smollm2_gguf):
    """transformers' tokenizer and model loaded from the same GGUF (dequantized to fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    return tok, model


def hf_greedy(hf_reference, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    _, model = hf_reference
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=2, pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def api_stub(stack):
    from protos.tandem.v1 import generation_pb2_grpc

    with grpc.insecure_channel(stack.address) as ch:
        yield generation_pb2_grpc.GenerationStub(ch)


@pytest.fixture(scope="session")
def engine_stub(stack):
    from protos.tandem.internal.v1 import engine_pb2_grpc

    with grpc.insecure_channel(stack.engine_address) as ch:
        yield engine_pb2_grpc.EngineStub(ch)
