"""Tiny GGUF files (Q4_0 and Q8_0 projections, written with gguf's writer) loaded with --quantization int4 / int8
against the same file's dequantized float load: Q4_0 -> int4 exactly, Q8_0 -> int8 within half a row step, and a
block type without an exact mapping (Q8_0 asked as int4) round-to-nearest int4 of the dequantized weight."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from engine_svc.core.request import SamplingParams
from engine_svc.quant.int4_format import dequantize_int4, quantize_int4
from engine_svc.quant.int4_linear import Int4Linear
from engine_svc.quant.int8_linear import Int8Linear
from tests.engine.family_checks import PROMPTS, make_engine, stepped_logits
from tests.quant.tiny_gguf import write_tiny_gguf

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-gguf")
    return {t: write_tiny_gguf(root / f"tiny-{t.name}.gguf", t, seed=3) for t in (T.Q4_0, T.Q8_0)}


def _logits(engine) -> list[torch.Tensor]:
    """Run to the end before the engine is used again (a generator left mid-step leaves the scheduler mid-step)."""
    return [logits for _, logits in stepped_logits(engine, PROMPTS, 4)]


def _pairs(engine, reference):
    for ours, ref in zip(engine.runner.model.model.layers, reference.runner.model.model.layers):
        for name in LINEARS:
            yield ours.get_submodule(name), ref.get_submodule(name).weight


def test_q4_0_as_int4_is_the_float_load(files):
    engine, reference = make_engine(files[T.Q4_0], quantization="int4"), make_engine(files[T.Q4_0])
    for module, weight in _pairs(engine, reference):
        assert isinstance(module, Int4Linear) and module.group_size == 32
        assert torch.equal(module.dequantized_weight(), weight)
    for a, b in zip(_logits(engine), _logits(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert engine.generate(PROMPTS, GREEDY) == reference.generate(PROMPTS, GREEDY)


def test_q8_0_as_int8_within_half_a_row_step(files):
    engine, reference = make_engine(files[T.Q8_0], quantization="int8"), make_engine(files[T.Q8_0])
    moved = 0
    for module, weight in _pairs(engine, reference):
        assert isinstance(module, Int8Linear)
        err = (module.dequantized_weight() - weight).abs().amax(dim=1)
        assert torch.all(err <= module.scales / 2 * (1 + 1e-6))
        moved += int((err > 0).sum())
    assert moved > 0     # the blocks of a row differ in scale: the requantization is not the identity here
    with torch.no_grad():  # the float model given the requantized weights computes what the int8 model does
        for module, weight in _pairs(engine, reference):
            weight.copy_(module.dequantized_weight())
    for a, b in zip(_logits(engine), _logits(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_q8_0_as_int4_is_round_to_nearest(files):
    engine, reference = make_engine(files[T.Q8_0], quantization="int4"), make_engine(files[T.Q8_0])
    for module, weight in _pairs(engine, reference):
        assert isinstance(module, Int4Linear) and module.group_size == 32
        assert torch.equal(module.dequantized_weight(), dequantize_int4(*quantize_int4(weight, 32), 32))
