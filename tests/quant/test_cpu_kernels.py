"""The C++ kernels of the CPU's single-token step (engine_svc.cpu_kernels): the float32 block GEMVs multiply by
exactly the float32 weights the blocks hold (a one-hot x returns a weight column bit for bit) and agree with the
torch reference, on the AVX-512 and the portable code alike; the integer q4 GEMV stays within its rounding of x;
the decode attention writes the cache and attends as the torch backend does; bad input gets a precise error; a
failed build falls back."""
from __future__ import annotations

import math

import pytest
import torch

from engine_svc import cpu_kernels
from engine_svc.attention.metadata import AttentionMetadata
from engine_svc.attention.torch_backend import TorchPagedAttention
from engine_svc.quant.gguf_gemv import GemvBlocks

EPS = 2.0 ** -24


@pytest.fixture(scope="module")
def ops():
    ops = cpu_kernels.load()
    if ops is None:
        pytest.skip(f"the C++ kernels cannot be built here: {cpu_kernels.load_error()}")
    return ops


@pytest.fixture(params=["native", "portable"])
def code(request, ops):
    """Each test once on the code the CPU picks (AVX-512 here) and once on the portable code."""
    ops.use_portable(request.param == "portable")
    yield request.param
    ops.use_portable(False)


def _blocks(kind: str, n: int, k: int, seed: int = 0) -> GemvBlocks:
    g = torch.Generator().manual_seed(seed)
    nb = k // 32
    scales = (torch.rand(n, nb, generator=g) * 0.02 + 1e-3).half()
    if kind == "q8":
        return GemvBlocks("q8", (torch.randint(-127, 128, (n, nb, 32), generator=g, dtype=torch.int8), scales))
    offsets = (-torch.rand(n, nb, generator=g) * 0.1).half()
    return GemvBlocks("q4", (torch.randint(0, 256, (n, nb, 16), generator=g, dtype=torch.uint8), scales, offsets))


def _op(ops, kind: str):
    return getattr(ops, f"{kind}_gemv")


# 13 rows: three groups of four and a tail row; 8320 features: 260 blocks, more than one stack chunk of scales
SHAPES = [(13, 96), (64, 576), (5, 8320)]


@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("n, k", SHAPES)
def test_one_hot_x_returns_the_weight_column_exactly(ops, code, kind, n, k):
    blocks = _blocks(kind, n, k)
    weight = blocks.dequantized()
    for col in (0, 15, 16, 31, 32, k - 1):
        x = torch.zeros(k)
        x[col] = 1.0
        assert torch.equal(_op(ops, kind)(x, *blocks.tensors), weight[:, col]), col


@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("n, k", SHAPES)
def test_gemv_is_the_matmul_within_float32_rounding(ops, code, kind, n, k):
    blocks = _blocks(kind, n, k, seed=1)
    weight = blocks.dequantized().double()
    x = torch.randn(k, generator=torch.Generator().manual_seed(2)) * 3
    exact = weight @ x.double()
    # each of 32 lanes sums k / 32 products in order, then the lanes are added: at most k / 32 + 5 roundings
    bound = (k / 32 + 6) * EPS * (weight.abs() @ x.double().abs())
    got = _op(ops, kind)(x, *blocks.tensors).double()
    assert ((got - exact).abs() <= bound).all()
    torch.testing.assert_close(got, blocks.reference(x).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op, tolerance", [("q4_gemv", 1e-6), ("q4_gemv_i8x3", 1e-5)])
def test_the_portable_code_sums_as_the_native_one(ops, op, tolerance):
    blocks = _blocks("q4", 64, 576, seed=3)
    x = torch.randn(576, generator=torch.Generator().manual_seed(4))
    native = getattr(ops, op)(x, *blocks.tensors)
    ops.use_portable(True)
    try:
        assert ops.isa() == "portable"
        portable = getattr(ops, op)(x, *blocks.tensors)
    finally:
        ops.use_portable(False)
    torch.testing.assert_close(portable, native, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("n, k", SHAPES)
def test_i8x3_gemv_rounds_x_to_23_bits_of_each_blocks_largest(ops, code, n, k):
    blocks = _blocks("q4", n, k, seed=7)
    weight = blocks.dequantized().double()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(k, generator=g) * torch.rand(k, generator=g) * 4
    x[32:64] = 0                                                 # an all-zero block has no scale
    exact = weight @ x.double()
    # x kept to (its block's max |x|) / 127 / 254^2 / 2 on the weights q * scale (the offsets multiply the float32
    # sum of x), plus float32 rounding of the block sums and their combination
    codes, scales, _ = blocks.tensors
    q = torch.cat([codes & 15, codes >> 4], dim=-1).double()      # [N, nb, 32]
    top = x.double().view(-1, 32).abs().amax(1)                   # [nb]
    rounding = (q.sum(-1) * scales.double() * top / 127 / (2 * 254 ** 2) * 1.01).sum(1)
    bound = rounding + (k / 32 + 8) * 4 * EPS * (weight.abs() @ x.double().abs())
    got = ops.q4_gemv_i8x3(x, *blocks.tensors).double()
    assert ((got - exact).abs() <= bound).all()


def test_gemv_input_errors(ops):
    blocks = _blocks("q4", 8, 64)
    codes, scales, offsets = blocks.tensors
    x = torch.zeros(64)
    cases = [((x.double(), codes, scales, offsets), "x must be a contiguous float32 vector"),
             ((torch.zeros(96), codes, scales, offsets), "x has 96 features, the codes 64"),
             ((x, codes.view(torch.int8), scales, offsets), "codes must be contiguous"),
             ((x, codes, scales.float(), offsets), "scales must be contiguous float16"),
             ((x, codes, scales, offsets[:4]), "offsets must be contiguous float16")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.q4_gemv(*args)
    for args, message in cases[:3]:
        with pytest.raises(RuntimeError, match=message):
            ops.q4_gemv_i8x3(*args)
    with pytest.raises(RuntimeError, match="scales and offsets must be contiguous float16"):
        ops.q4_gemv_i8x3(x, codes, scales, offsets[:4])


H, KVH, D, BS, NB = 6, 2, 32, 4, 24


def _attention_case(seq_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, NB, BS, KVH, D, generator=g)
    table = torch.randperm(NB, generator=g)[:math.ceil(seq_len / BS) + 1].int()   # one spare block: padding
    pos = seq_len - 1
    slot = int(table[pos // BS]) * BS + pos % BS
    q, k, v = (torch.randn(1, heads, D, generator=g) for heads in (H, KVH, KVH))
    meta = AttentionMetadata(slot_mapping=torch.tensor([slot]), block_tables=table[None],
                             seq_lens=torch.tensor([seq_len], dtype=torch.int32),
                             query_start=torch.tensor([0, 1], dtype=torch.int32), query_lens_cpu=[1],
                             seq_lens_cpu=[seq_len], block_size=BS)
    return cache, table, slot, (q, k, v), meta


@pytest.mark.parametrize("seq_len, window", [(1, None), (7, None), (33, None), (33, 5), (33, 64)])
@pytest.mark.parametrize("path", ["native", "portable"])
def test_decode_attention_is_the_torch_backends(ops, seq_len, window, path, monkeypatch):
    cache, table, slot, (q, k, v), meta = _attention_case(seq_len, seed=seq_len)
    backend, expected_cache = TorchPagedAttention(), cache.clone()
    backend.write_kv(k, v, expected_cache, meta)
    expected = backend.forward(q, expected_cache, meta, 0.3, window=window)
    if path == "portable":
        ops.use_portable(True)
    try:
        out = ops.decode_attention(q[0], k[0], v[0], cache, table, seq_len, slot, 0.3, window or 0)
    finally:
        ops.use_portable(False)
    assert torch.equal(cache, expected_cache)
    torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-5)


def test_decode_attention_input_errors(ops):
    cache, table, slot, (q, k, v), _ = _attention_case(9, seed=0)
    cases = [((q[0].double(), k[0], v[0], cache, table, 9, slot), "contiguous float32"),
             ((q[0], k[0], v[0], cache[0], table, 9, slot), "cache must be"),
             ((q[0, :5], k[0], v[0], cache, table, 9, slot), "heads a multiple"),
             ((q[0], k[0, :1], v[0], cache, table, 9, slot), "k and v must be"),
             ((q[0], k[0], v[0], cache, table.long(), 9, slot), "block_table must be"),
             ((q[0], k[0], v[0], cache, table, 99, slot), "seq_len 99 outside"),
             ((q[0], k[0], v[0], cache, table, 9, NB * BS), "outside the cache"),
             ((q[0], k[0], v[0], cache, table + NB, 9, slot), "outside the cache's 24 blocks")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.decode_attention(*args, 0.3, 0)


def test_a_failed_build_leaves_the_ops_unloaded_with_the_reason(tmp_path, monkeypatch):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", (bad,))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("TANDEM_KERNEL_CACHE", str(tmp_path / "cache"))
    assert cpu_kernels.load() is None
    assert "g++ failed" in cpu_kernels.load_error()
    assert cpu_kernels.describe_gemv().startswith("inductor (C++ kernels unavailable: RuntimeError: g++ failed")
    assert not list((tmp_path / "cache").glob("*.so"))   # no half-written library left behind
