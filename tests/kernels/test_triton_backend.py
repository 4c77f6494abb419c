"""TritonPagedAttention against TorchPagedAttention through the backend interface (write_kv then forward) on mixed
and decode-only batches; registration and configuration of the "triton" backend."""
from __future__ import annotations

import pytest
import torch

from engine_svc.attention import TorchPagedAttention, get_backend
from engine_svc.attention.triton_backend import TritonPagedAttention
from engine_svc.config import EngineConfig, config_from_args
from tests.kernels.paged import make_batch


def write_then_attend(backend, batch, k, v):
    cache = batch.kv_cache.clone()
    backend.write_kv(k, v, cache, batch.meta)
    return cache, backend.forward(batch.q, cache, batch.meta, batch.scale)


@pytest.mark.parametrize("q_lens,seq_lens", [
    ([4, 1, 6, 1], [4, 21, 30, 9]),   # mixed: prompt, decode, chunk over a cached prefix, decode
    ([1, 1, 1], [3, 37, 20]),         # decode only
], ids=["mixed", "decode"])
def test_matches_torch_backend(device, q_lens, seq_lens):
    batch = make_batch(q_lens, seq_lens, num_heads=6, kv_heads=2, block_size=4, device=device, seed=11)
    g = torch.Generator().manual_seed(12)
    k = torch.randn(len(batch.meta.slot_mapping), 2, 16, generator=g).to(device)
    v = torch.randn(len(batch.meta.slot_mapping), 2, 16, generator=g).to(device)
    ref_cache, ref_out = write_then_attend(TorchPagedAttention(), batch, k, v)
    cache, out = write_then_attend(TritonPagedAttention(decode_partition_size=16), batch, k, v)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def test_registered_as_triton():
    backend = get_backend("triton")
    assert isinstance(backend, TritonPagedAttention) and backend.name == "triton"


def test_config_accepts_only_known_backends(capsys):
    assert config_from_args(["--model", "m", "--attention-backend", "triton"]).attention_backend == "triton"
    with pytest.raises(SystemExit):
        config_from_args(["--model", "m", "--attention-backend", "flash"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(model="m", attention_backend="flash")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only used without CUDA")
def test_interpreter_in_effect_without_cuda():
    from engine_svc.kernels.paged_decode_attention import _decode_kernel
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(_decode_kernel, InterpretedFunction)
