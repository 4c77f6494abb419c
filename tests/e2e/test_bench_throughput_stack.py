"""`tandem bench throughput --mode both`: the engine run and the run through a started stack, on the default model
and on a random-weight config with no network (the unit tests of the benchmark are in tests/benchmarks/)."""
from __future__ import annotations

import json

import pytest

from benchmarks import throughput
from tests.engine.tiny_models import write_tiny_llama

CPU = ["--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", max_position_embeddings=256)


@pytest.mark.stack
def test_throughput_both_modes_through_a_started_stack(smollm2_gguf, tmp_path):
    out = tmp_path / "tp.json"
    throughput.main(["--model", str(smollm2_gguf), *CPU, "--mode", "both", "--num-requests", "3",
                     "--input-len", "8", "16", "--output-len", "4", "8", "--max-model-len", "256",
                     "--num-kv-blocks", "64", "--stack-log", str(tmp_path / "stack.log"), "--json", str(out)])
    result = json.loads(out.read_text())
    engine, stack = result["runs"]
    assert (engine["run"], stack["run"]) == ("engine", "stack")
    assert engine["finished"] == stack["finished"] == 3 and stack["errors"] == 0
    # Same prompt ids on both sides: the stack's tokenizer counted what the engine run was given.
    assert stack["prompt_tokens"] == engine["prompt_tokens"]
    # Greedy without ignore_eos: a request may stop early, never later.
    assert 3 <= stack["output_tokens"] <= engine["output_tokens"]
    assert result["stack_vs_engine_output_tok_s"] > 0


@pytest.mark.stack
def test_throughput_both_modes_of_a_random_weight_config_need_no_network(tiny, tmp_path, monkeypatch):
    """A config .json with dummy weights has no tokenizer: the stack serves one built for its vocabulary, with pip
    barred from any index and an empty model cache (as on a GPU machine without network), and serves every
    request on the same prompt ids as the engine run."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("TANDEM_CACHE", str(cache))
    out = tmp_path / "tp.json"
    result = throughput.main(["--model", str(tiny / "config.json"), "--load-format", "dummy", *CPU, "--mode", "both",
                              "--num-requests", "4", "--input-len", "6", "12", "--output-len", "3", "6",
                              "--max-model-len", "64", "--num-kv-blocks", "32",
                              "--stack-log", str(tmp_path / "stack.log"), "--json", str(out)])
    engine, stack = result["runs"]
    assert engine["finished"] == stack["finished"] == 4 and stack["errors"] == 0
    assert stack["prompt_tokens"] == engine["prompt_tokens"]
    assert 4 <= stack["output_tokens"] <= engine["output_tokens"]
    assert list(cache.iterdir()) == []   # nothing was fetched
