"""Mistral (the Llama layers with a sliding window) against Hugging Face transformers on tiny random checkpoints
(fp32, CPU), without a window and with a 5-token window shorter than the prompts: prefill and paged-decode logits,
greedy continuations, and the Triton backend (under the interpreter on the CPU) against the torch backend."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

# The Triton kernels need the interpreter switched on before anything imports triton (see engine_svc.kernels).
try:
    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton is not installed")
    importlib.import_module("engine_svc.kernels")
    TRITON_SKIP = None
except ImportError as e:
    TRITON_SKIP = str(e)

from engine_svc.config import EngineConfig  # noqa: E402
from engine_svc.core.request import SamplingParams  # noqa: E402
from engine_svc.engine import Engine  # noqa: E402
from engine_svc.models import MODEL_REGISTRY  # noqa: E402
from engine_svc.models.mistral import MistralForCausalLM  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 9, 11, 13], [1, 2], [300, 301, 302, 303, 304, 305, 306, 307, 308]]
WINDOW = 5
VARIANTS = {"no-window": None, "window5": WINDOW}


def write_tiny_mistral(path, *, sliding_window: int | None, seed: int = 0):
    from transformers import MistralConfig
    from transformers import MistralForCausalLM as HFMistral

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=sliding_window, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = HFMistral(cfg).float()
    with torch.no_grad():  # HF's init is tiny; larger weights make logits discriminative
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    return write_tiny_mistral(tmp_path_factory.mktemp(request.param), sliding_window=VARIANTS[request.param],
                              seed=11)


def hf_model(path, **kw):
    from transformers import AutoModelForCausalLM
    # eager attention: the plain masked softmax, which applies the sliding window in every forward.
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager",
                                                **kw).eval()


def make_engine(path, **kw) -> Engine:
    cfg = dict(model=str(path), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_num_seqs=8)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def test_registered_and_reads_the_window(checkpoint):
    engine = make_engine(checkpoint)
    assert MODEL_REGISTRY["MistralForCausalLM"] is MistralForCausalLM
    assert isinstance(engine.runner.model, MistralForCausalLM)
    expected = json.loads((checkpoint / "config.json").read_text()).get("sliding_window")
    assert expected in VARIANTS.values()
    windows = {layer.self_attn.sliding_window for layer in engine.runner.model.model.layers}
    assert windows == {expected}


def test_transformers_applies_the_window(checkpoint):
    """The reference really is windowed: with the window lifted the same weights give other late logits."""
    windowed = hf_model(checkpoint)
    if windowed.config.sliding_window is None:
        pytest.skip("no window in this variant")
    full = hf_model(checkpoint, sliding_window=None)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        a, b = windowed(ids).logits[0], full(ids).logits[0]
    torch.testing.assert_close(a[:WINDOW], b[:WINDOW])              # positions < window see their whole prefix
    assert (a[WINDOW:] - b[WINDOW:]).abs().amax(-1).min() > 1e-3    # later ones do not


def test_prefill_and_paged_decode_logits_match(checkpoint):
    ref = hf_model(checkpoint)
    engine = make_engine(checkpoint)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, greedy)
    seqs = {f"r{i}": list(p) for i, p in enumerate(PROMPTS)}
    steps = 0
    while engine.has_work():
        out = engine.scheduler.schedule()
        logits = engine.runner.forward_logits(out)
        sampling = [s for s in out.scheduled if s.samples]
        with torch.no_grad():
            for row, s in enumerate(sampling):
                expected = ref(torch.tensor([seqs[s.request.request_id]])).logits[0, -1].float()
                torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
        sampled = logits.argmax(-1).tolist()
        for s, tok in zip(sampling, sampled):
            seqs[s.request.request_id].append(tok)
        engine.scheduler.update(out, sampled)
        steps += 1
    assert steps == 8   # one prefill and 7 decode steps through the cache, crossing 4-token block boundaries
    assert engine.kv.num_used_blocks == 0


def test_greedy_continuations_identical(checkpoint):
    ref = hf_model(checkpoint)
    outs = make_engine(checkpoint).generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = list(prompt)
        with torch.no_grad():   # full forwards, so no cache layout of transformers is involved
            for _ in range(16):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out == ids[len(prompt):]


@pytest.mark.skipif(TRITON_SKIP is not None, reason=f"triton unavailable: {TRITON_SKIP}")
def test_triton_backend_greedy_equals_torch_with_window(tmp_path):
    path = write_tiny_mistral(tmp_path / "window5", sliding_window=WINDOW, seed=11)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [PROMPTS[0], PROMPTS[2][:7]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    # A 6-token step budget: the 11-token prompt is prefilled in two chunks, the second over a cached prefix.
    kw = dict(device=device, max_num_batched_tokens=6, enforce_eager=True)
    expected = make_engine(path, attention_backend="torch", **kw).generate(prompts, params)
    assert make_engine(path, attention_backend="triton", **kw).generate(prompts, params) == expected
