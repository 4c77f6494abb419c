"""`tandem serve` with no precision options, the README's first command: on the CPU the default model's
single-token steps run the batch-1 GEMVs over the GGUF's blocks, and its greedy output through the whole stack
equals transformers' on the same file (the float32 path's, which the other stack tests pin)."""
from __future__ import annotations

import grpc

from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc
from tests.e2e.conftest import cpu_stack, hf_greedy

MAX_TOKENS = 24
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def test_the_default_settings_serve_the_gemv_path_with_transformers_greedy_tokens(smollm2_gguf, hf_reference,
                                                                                  tmp_path):
    tok, _ = hf_reference
    with cpu_stack(smollm2_gguf, tmp_path / "serve.log", [], [], dtype=None) as (stack, _):
        with grpc.insecure_channel(stack.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            for prompt in PROMPTS:
                request = api.GenerateRequest(prompt=prompt, params=api.GenerationParams(max_tokens=MAX_TOKENS,
                                                                                         temperature=0.0))
                ids = [t for c in stub.GenerateStream(request, timeout=120) for t in c.token_ids]
                assert ids == hf_greedy(hf_reference, tok(prompt)["input_ids"], MAX_TOKENS), prompt
    log = stack.log.read_text()
    assert "float32 with batch-1 GEMVs over the GGUF's blocks" in log and "single-token steps in compiled" in log
