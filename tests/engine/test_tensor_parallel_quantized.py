"""int8 and int4 weights (round to nearest on load, the CPU's torch path; and a GGUF's Q4_0 blocks loaded as int4)
under tensor parallelism at T=2 give the single-process quantized engine's logits within 1e-4 in fp32 and the same
tokens over 32 steps with chunked prefill, a prefix-cache hit, preemption and n > 1: each rank's shard is its cut of the one-process weight (int8's
row scales taken over the whole row, int4's groups whole on each rank).

The checks are tests/engine/test_tensor_parallel.py's, collected here again over this module's `engines`."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from engine_svc.distributed.layers import RowParallelLinear
from engine_svc.distributed.parallel_state import TensorParallel
from engine_svc.engine import Engine
from engine_svc.quant.row_parallel import RowParallelInt4Linear, RowParallelInt8Linear, row_parallel_group
from tests.engine.family_checks import engine_config
from tests.engine.test_tensor_parallel import (  # noqa: F401 - collected as this module's tests
    test_prefill_and_decode_logits_equal_single_process,
    test_tokens_equal_single_process_with_chunking_prefix_hits_preemption_and_n)
from tests.engine.tiny_models import write_tiny_family
from tests.quant.tiny_gguf import write_tiny_gguf

# Shapes whose row-parallel inputs split into whole int4 groups of 128 at T=2 (o_proj 256 -> 2 x 128, down_proj
# 512 -> 2 x 256).
SHAPES = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
LAYERS = {"int8": RowParallelInt8Linear, "int4": RowParallelInt4Linear}
CASES = {   # name -> quantization, checkpoint writer
    "int8": ("int8", lambda path: write_tiny_family(path, "llama", seed=4, **SHAPES)),
    "int4": ("int4", lambda path: write_tiny_family(path, "llama", seed=4, **SHAPES)),
    # Q4_0 blocks mapped onto int4 groups of 32, each rank reading its rows and its columns' blocks of the file.
    "gguf-q4_0-int4": ("int4", lambda path: write_tiny_gguf(path / "tiny.gguf", GGMLQuantizationType.Q4_0, seed=4)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def engines(request, tmp_path_factory):
    quantization, write = CASES[request.param]
    path = write(tmp_path_factory.mktemp(f"tp-{request.param}"))
    single = Engine(engine_config(path, quantization=quantization))
    parallel = Engine(engine_config(path, quantization=quantization, tensor_parallel_size=2))
    layer = parallel.runner.model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, LAYERS[quantization])
    assert isinstance(layer.mlp.down_proj, LAYERS[quantization])
    yield single, parallel
    parallel.shutdown()


def test_int4_groups_that_straddle_ranks_are_refused_by_name():
    rank1 = RowParallelLinear((192, 576), 576, 8, False, TensorParallel(rank=1, size=2))
    assert row_parallel_group(rank1, 64) == 64
    with pytest.raises(ValueError, match=r"int4 groups of 128 .* rank 1 holds input features \[192, 576\) of 576"):
        row_parallel_group(rank1, 128)


def test_row_parallel_fp8_shards_are_the_whole_layer_cut_and_scale_activations_per_rank(monkeypatch):
    """fp8 has no CPU engine path (the engine needs compute capability >= 8.9), so its shards are checked as layers,
    with the emulated arithmetic: each rank's e4m3 columns and row scales are the single process's, cut (the
    all-reduce MAX stood in for by the whole row's maximum); the shares, summed, are W8A8 with each rank's
    activations scaled over its own columns (an independent float64 reference)."""
    from engine_svc.quant.fp8_linear import Fp8Linear
    from engine_svc.quant.row_parallel import quantize_row_parallel
    from tests.quant.e4m3_reference import round_to_e4m3

    torch.manual_seed(0)
    whole = torch.nn.Linear(64, 32, bias=True)
    whole.weight.data[:, 40] = 3.0   # every row's largest weight is on rank 1
    expected = Fp8Linear.from_linear(whole, emulate=True)
    monkeypatch.setattr(TensorParallel, "max_", lambda self, x: x.copy_(whole.weight.detach().abs().amax(1)))
    x = torch.randn(5, 64) * torch.logspace(-2, 1, 5)[:, None]
    total, reference = 0, whole.bias.detach().double()
    sw = whole.weight.detach().double().abs().amax(1, keepdim=True) / 448
    for rank, cols in enumerate([(0, 32), (32, 64)]):
        shard = RowParallelLinear(cols, 64, 32, True, TensorParallel(rank=rank, size=2))
        with torch.no_grad():
            shard.weight.copy_(whole.weight[:, slice(*cols)])
            shard.bias.copy_(whole.bias)
        got = quantize_row_parallel(shard, "fp8", 128, use_triton=False, emulate_fp8=True)
        assert torch.equal(got.qweight.float(), expected.qweight[:, slice(*cols)].float())
        assert torch.equal(got.scales, expected.scales)
        xr, wr = x[:, slice(*cols)].double(), whole.weight.detach()[:, slice(*cols)].double()
        sx = xr.abs().amax(1, keepdim=True) / 448
        reference = reference + (round_to_e4m3(xr / sx) * sx) @ (round_to_e4m3(wr / sw) * sw).t()
        total = total + got.partial(x[:, slice(*cols)])
    torch.testing.assert_close((total + whole.bias).double(), reference, rtol=1e-5, atol=1e-5)
