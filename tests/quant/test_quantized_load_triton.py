"""Quantized loads with attention_backend="triton": the Int4Linear / Int8Linear modules built for the checkpoint
run the Triton int4 / int8 kernels, and greedy generation equals the torch backend's (torch reference layers).
The tiny AWQ / GPTQ checks run anywhere (Triton interpreter on CPU); the SmolLM2 GGUF one needs a GPU."""
from __future__ import annotations

import pytest
import torch

from engine_svc.core.request import SamplingParams
from engine_svc.quant.int4_linear import Int4Linear
from engine_svc.quant.int8_linear import Int8Linear
from tests.engine.family_checks import make_engine, stepped_logits
from tests.quant.tiny_packed import write_packed_pair

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 9, 11, 13], [1, 2]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_packed_checkpoint_triton_equals_torch(tmp_path, method):
    quantized, _ = write_packed_pair(tmp_path, method)
    triton = make_engine(quantized, device=DEVICE, attention_backend="triton", enforce_eager=True)
    qkv = triton.runner.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int4Linear) and qkv.use_triton and qkv.qweight.device.type == DEVICE
    torch_engine = make_engine(quantized, device=DEVICE, attention_backend="torch")
    assert triton.generate(PROMPTS, GREEDY) == torch_engine.generate(PROMPTS, GREEDY)


SMOL_PROMPT = [1, 4093, 314, 260, 3575, 282, 4649, 47]


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_smollm2_gguf_quantized_on_gpu(smollm2_gguf, quantization):
    """float16: Q4_1's d and m are fp16, so the int4 modules hold the file's weights exactly; the float load rounds
    d * q + m to fp16. The first logits stay close and 8 greedy tokens agree."""
    def engine(q):
        return make_engine(smollm2_gguf, device="cuda", dtype="float16", attention_backend="triton",
                           quantization=q, block_size=16, num_kv_blocks=64, max_num_seqs=1)
    quantized, reference = engine(quantization), engine("none")
    kind = Int4Linear if quantization == "int4" else Int8Linear
    layer = quantized.runner.model.model.layers[0]
    assert isinstance(layer.mlp.gate_up_proj, kind) and layer.mlp.gate_up_proj.use_triton
    [(_, ours)] = list(stepped_logits(quantized, [SMOL_PROMPT], steps=1))
    [(_, ref)] = list(stepped_logits(reference, [SMOL_PROMPT], steps=1))
    ours, ref = ours.float().cpu(), ref.float().cpu()
    assert ours.argmax() == ref.argmax()
    torch.testing.assert_close(ours, ref, rtol=0, atol=0.5 if quantization == "int4" else 1.5)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert quantized.generate([SMOL_PROMPT], greedy) == reference.generate([SMOL_PROMPT], greedy)
