"""AWQ GEMM and GPTQ layer tensors, packed here from known integers by an independent packer (packing_spec), come
out of the converters as int4 weights whose dequantization is exactly (q - zero) * scale."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_svc.quant.awq import awq_to_int4
from engine_svc.quant.gptq import gptq_to_int4
from engine_svc.quant.int4_format import dequantize_int4, unpack_int4
from tests.quant.packing_spec import awq_pack_along_columns, gptq_pack_columns, gptq_pack_rows, random_layer


def _awq_tensors(q, zeros, scales):
    # AWQ stores everything input-major: qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N]
    return (awq_pack_along_columns(q.T), awq_pack_along_columns(zeros.T),
            torch.from_numpy(scales.T.astype(np.float16)))


def _gptq_tensors(q, zeros, scales, stored_zero_offset):
    return (gptq_pack_rows(q.T), gptq_pack_columns(zeros.T - stored_zero_offset),
            torch.from_numpy(scales.T.astype(np.float16)))


@pytest.mark.parametrize("n,k,group", [(16, 64, 32), (24, 128, 128), (8, 96, 16)])
def test_awq_dequantizes_exactly(n, k, group):
    q, zeros, scales, ref = random_layer(n, k, group, seed=n + k)
    qweight, scl, off = awq_to_int4(*_awq_tensors(q, zeros, scales), group_size=group)
    assert qweight.dtype == torch.uint8 and qweight.shape == (n, k // 2)
    assert scl.shape == off.shape == (n, k // group)
    assert torch.equal(unpack_int4(qweight).long(), torch.from_numpy(q))
    assert torch.equal(dequantize_int4(qweight, scl, off, group), ref)


def test_awq_group_minus_one_is_one_group_per_row():
    q, zeros, scales, ref = random_layer(8, 64, 64, seed=3)
    out = awq_to_int4(*_awq_tensors(q, zeros, scales), group_size=-1)
    assert out[1].shape == (8, 1)
    assert torch.equal(dequantize_int4(*out, 64), ref)


@pytest.mark.parametrize("n,k,group", [(16, 64, 32), (32, 128, 64), (8, 256, 128)])
def test_gptq_v1_dequantizes_exactly(n, k, group):
    # v1 stores zero - 1, so a zero of 0 is not representable (AutoGPTQ's known wrap-around): zeros in 1..15
    q, zeros, scales, ref = random_layer(n, k, group, seed=n * k, zero_low=1)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    qweight, scl, off = gptq_to_int4(*_gptq_tensors(q, zeros, scales, 1), group_size=group, g_idx=g_idx)
    assert torch.equal(unpack_int4(qweight).long(), torch.from_numpy(q))
    assert torch.equal(dequantize_int4(qweight, scl, off, group), ref)


def test_gptq_v2_stores_the_zero_itself():
    q, zeros, scales, ref = random_layer(16, 64, 32, seed=7)
    out = gptq_to_int4(*_gptq_tensors(q, zeros, scales, 0), group_size=32, zero_minus_one=False)
    assert torch.equal(dequantize_int4(*out, 32), ref)


def test_gptq_v1_sym_zero_eight_is_stored_as_seven():
    q, _, scales, _ = random_layer(8, 64, 32, seed=9)
    zeros = np.full((8, 2), 8)
    qweight, qzeros, s = _gptq_tensors(q, zeros, scales, 1)
    assert int(qzeros[0, 0]) == 0x77777777
    out = gptq_to_int4(qweight, qzeros, s, group_size=32)
    ref = (torch.from_numpy(q).float() - 8) * torch.from_numpy(np.repeat(scales, 32, axis=1))
    assert torch.equal(dequantize_int4(*out, 32), ref)


def test_gptq_act_order_g_idx_is_refused():
    q, zeros, scales, _ = random_layer(8, 64, 32, seed=1, zero_low=1)
    g_idx = torch.from_numpy(np.random.default_rng(0).permutation(np.arange(64) // 32).astype(np.int32))
    with pytest.raises(ValueError, match="act order"):
        gptq_to_int4(*_gptq_tensors(q, zeros, scales, 1), group_size=32, g_idx=g_idx)


def test_shape_disagreements_and_bad_groups_are_refused():
    q, zeros, scales, _ = random_layer(8, 64, 32, seed=2, zero_low=1)
    aw = _awq_tensors(q, zeros, scales)
    with pytest.raises(ValueError, match="disagree"):
        awq_to_int4(*aw, group_size=16)       # the scales hold 2 groups, not 4
    with pytest.raises(ValueError, match="groups of 48"):
        awq_to_int4(*aw, group_size=48)
    gp = _gptq_tensors(q, zeros, scales, 1)
    with pytest.raises(ValueError, match="disagree"):
        gptq_to_int4(gp[0], gp[1][:1], gp[2], group_size=32)
    with pytest.raises(ValueError, match="int32"):
        gptq_to_int4(gp[0].to(torch.int64), gp[1], gp[2], group_size=32)
