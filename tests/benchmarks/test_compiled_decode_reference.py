"""The issue-16 decode anchor (benchmarks/compiled_decode_reference.py) computes the model it claims to: on the same
tiny checkpoint its greedy tokens and last-step logits equal transformers' LlamaForCausalLM's, eager and compiled,
tied and untied, and its tokens equal Tandem's engine's; its command line writes the figures issue16_table reads."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import compiled_decode_reference as ref
from tests.engine.tiny_models import write_tiny_family, write_tiny_llama

PROMPT = [5, 17, 99, 3, 250, 42, 7, 300, 12]
NEW = 6


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("anchor-untied"), seed=4)


@pytest.fixture(scope="module")
def tied_scaled(tmp_path_factory):
    """Tied, with llama3 rope scaling (its scaled frequencies are the reference's own code too)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    return write_tiny_llama(tmp_path_factory.mktemp("anchor-tied"), seed=4, tie=True, rope_scaling=scaling)


@pytest.fixture(params=["untied", "tied_scaled"])
def tiny(request):
    return request.getfixturevalue(request.param)


def hf_greedy(path, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens (a full forward per token) and the logits the last one was drawn from."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids, logits = list(prompt), None
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], logits


def reference_greedy(path, mode: str, runs: int = 1, device: str = "cpu") -> ref.Generation:
    model = ref.build(str(path), len(PROMPT) + NEW, torch.device(device), torch.float32, random_weights=False)
    step = ref.make_step(mode, model, coordinate_descent=False)
    return [ref.generate(model, step, PROMPT, NEW) for _ in range(runs)][-1]


def assert_decodes_as_transformers(path, mode: str) -> None:
    tokens, logits = hf_greedy(path, PROMPT, NEW)
    # Twice on one model: a second request over the first's cache must not see its keys.
    got = reference_greedy(path, mode, runs=2)
    assert got.tokens == tokens
    torch.testing.assert_close(got.last_logits[0], logits, atol=1e-4, rtol=1e-4)


def test_the_eager_reference_decodes_as_transformers_does(tiny):
    assert_decodes_as_transformers(tiny, "eager")


def test_the_compiled_reference_decodes_as_transformers_does(tmp_path):
    # One layer: inductor's cold compile on the CPU grows with the layers (~25 s for one on 2 busy cores).
    one_layer = write_tiny_llama(tmp_path / "one-layer", seed=4, num_layers=1)
    assert_decodes_as_transformers(one_layer, "default")


@pytest.mark.gpu
def test_the_cuda_graph_step_decodes_as_the_eager_one(untied):
    """The step the GPU measures: reduce-overhead (CUDA graphs, no graph skipped) computes the eager step."""
    skips = ref.cudagraph_skips()
    eager = reference_greedy(untied, "eager", device="cuda")
    graphed = reference_greedy(untied, "reduce-overhead", runs=3, device="cuda")
    assert graphed.tokens == eager.tokens and ref.cudagraph_skips() == skips
    torch.testing.assert_close(graphed.last_logits, eager.last_logits, atol=1e-3, rtol=1e-3)


def test_the_reference_decodes_as_the_engine_does(tiny):
    from engine_svc.config import EngineConfig
    from engine_svc.core.request import SamplingParams
    from engine_svc.engine import Engine
    engine = Engine(EngineConfig(model=str(tiny), device="cpu", dtype="float32", block_size=4, num_kv_blocks=16,
                                 max_num_seqs=1, max_num_batched_tokens=32))
    engine.add_request("a", PROMPT, SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True))
    tokens = []
    while engine.has_work():
        for o in engine.step():
            tokens += o.new_token_ids
    assert reference_greedy(tiny, "eager").tokens == tokens


def test_the_command_line_writes_the_decode_figures(untied, tmp_path, capsys):
    out = tmp_path / "ref.json"
    result = ref.main(["--model", str(untied), "--device", "cpu", "--prompt-len", "6", "--output-len", "4",
                       "--repeats", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    d = result["decode"]
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["compile"] == "eager"
    assert not result["random_weights"] and result["max_len"] == 10 and len(d["runs"]) == 2
    assert d["decode_tok_s_min"] <= d["decode_tok_s_median"] <= d["decode_tok_s_max"]
    assert d["ms_per_token_median"] == pytest.approx(1e3 / d["decode_tok_s_median"])
    assert "compiled static-cache decode (gpt-fast's method)" in capsys.readouterr().out


def test_a_model_it_does_not_compute_is_refused_with_its_reason(tmp_path):
    qwen = write_tiny_family(tmp_path / "qwen", "qwen2")
    with pytest.raises(SystemExit, match="plain Llama; qwen is Qwen2ForCausalLM"):
        ref.main(["--model", str(qwen), "--device", "cpu", "--prompt-len", "4", "--output-len", "2"])
    with pytest.raises(SystemExit):
        ref.parse_args(["--model", str(tmp_path / "nowhere")])
