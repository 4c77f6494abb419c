"""The latency and throughput benchmarks run end to end on tiny sizes and their figures mean what they say.
No timing is asserted: only counts, shapes and the bookkeeping behind the rates."""
from __future__ import annotations

import json

import pytest

from benchmarks import latency, model_arg, throughput
from engine_svc.loader import read_model_config
from tests.engine.tiny_models import write_tiny_llama

CPU = ["--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", max_position_embeddings=256)


def test_latency_on_a_tiny_model(tiny, tmp_path, capsys):
    out = tmp_path / "latency.json"
    latency.main(["--model", str(tiny), *CPU, "--prompt-len", "8", "--output-len", "5", "--ttft-prompt-lens", "4",
                  "40", "--repeats", "2", "--max-num-batched-tokens", "16", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {"benchmark", "model", "device", "dtype", "max_num_batched_tokens", "decode", "ttft"} <= result.keys()
    decode = result["decode"]
    assert (decode["prompt_len"], decode["output_len"], len(decode["runs"])) == (8, 5, 2)
    assert decode["decode_tok_s_min"] <= decode["decode_tok_s_median"] <= decode["decode_tok_s_max"]
    assert all(r["decode_s"] > 0 and r["ttft_s"] > 0 for r in decode["runs"])
    short, long = result["ttft"]
    assert (short["prompt_len"], long["prompt_len"]) == (4, 40)
    # The budget of 16 tokens per step splits the 40-token prefill into 3 chunks; 4 tokens fit in one step.
    assert (short["steps_per_request"], long["steps_per_request"]) == (1, 3)
    assert len(long["ttft_ms"]) == 2 and long["ttft_ms_min"] <= long["ttft_ms_median"] <= long["ttft_ms_max"]
    table = capsys.readouterr().out
    assert "decode tok/s" in table and "prefill tok/s" in table


def test_latency_compares_speculative_decoding_with_none(tiny, tmp_path, capsys):
    out = tmp_path / "latency.json"
    latency.main(["--model", str(tiny), *CPU, "--workload", "quote", "--prompt-len", "12", "--output-len", "6",
                  "--ttft-prompt-lens", "--repeats", "1", "--warmup", "0", "--speculative-method", "draft",
                  "--draft-model", str(tiny), "--num-speculative-tokens", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["decode"]["speculative"] is None and result["decode"]["prompt_len"] == 12
    spec = result["speculative_decode"]["speculative"]
    assert (spec["method"], spec["num_speculative_tokens"]) == ("draft", 2)
    # The model drafting for itself accepts every proposal. After the first token, 5 more in 2 verify rows: 2
    # proposals + 1, then 1 (max_tokens is near) + 1.
    assert (spec["num_drafts"], spec["acceptance_rate"], spec["mean_accepted_length"]) == (2, 1.0, 2.5)
    assert spec["num_accepted_tokens"] == sum(spec["accepted_per_pos"])
    table = capsys.readouterr().out
    assert "speculative decoding: quote workload" in table and "mean acc. len" in table


def test_latency_with_weight_offload_reports_the_bus_bound(tiny, tmp_path, capsys):
    out = tmp_path / "latency.json"
    # The tiny Llama's 2 layers are 148 KB each: 0.3 MB offloads both.
    latency.main(["--model", str(tiny), *CPU, "--prompt-len", "4", "--output-len", "3", "--ttft-prompt-lens",
                  "--repeats", "1", "--warmup", "0", "--cpu-offload-gb", str(0.3e6 / (1 << 30)), "--json", str(out)])
    w = json.loads(out.read_text())["decode"]["weight_offload"]
    assert w["layers"] == 2 and w["bus_bound_tok_s"] == pytest.approx(w["bandwidth_gb_s"] / w["offloaded_gb"])
    assert "bus-bound" in capsys.readouterr().out


def test_throughput_engine_mode_counts_every_drawn_token(tiny, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    argv = ["--model", str(tiny), *CPU, "--num-requests", "7", "--input-len", "3", "20", "--output-len", "1", "9",
            "--max-num-seqs", "3", "--seed", "5", "--json", str(out)]
    throughput.main(argv)
    result = json.loads(out.read_text())
    lengths = throughput.draw_lengths(7, (3, 20), (1, 9), seed=5)
    (run,) = result["runs"]
    assert run["run"] == "engine" and run["finished"] == 7 and run["errors"] == 0
    assert run["prompt_tokens"] == sum(n for n, _ in lengths)
    assert run["output_tokens"] == run["expected_output_tokens"] == sum(n for _, n in lengths)
    # At most 3 running at once: at least as many steps as the longest output, and enough for 3-wide batches.
    assert run["steps"] >= max(n for _, n in lengths) and run["steps"] >= sum(n for _, n in lengths) / 3
    assert result["stack_vs_engine_output_tok_s"] is None
    assert run["output_tok_s"] < run["total_tok_s"]
    assert "output tok/s" in capsys.readouterr().out


def test_a_ratio_over_unequal_work_is_never_given():
    engine = {"finished": 300, "errors": 0, "output_tok_s": 9026.0}
    stack = {"finished": 256, "errors": 44, "output_tok_s": 9595.0}   # the H200 run: 44 refused at the gateway
    ratio, why = throughput.stack_engine_ratio({"engine": engine, "stack": stack}, 300)
    assert ratio is None and why == "stack: 256 of 300 finished, 44 errors"
    stack = {"finished": 300, "errors": 0, "output_tok_s": 8853.0}
    assert throughput.stack_engine_ratio({"engine": engine, "stack": stack}, 300) == (8853.0 / 9026.0, None)
    assert throughput.stack_engine_ratio({"engine": engine}, 300) == (None, None)


def test_lengths_are_seeded_and_in_range():
    a = throughput.draw_lengths(50, (128, 1024), (4, 8), seed=1)
    assert a == throughput.draw_lengths(50, (128, 1024), (4, 8), seed=1)
    assert a != throughput.draw_lengths(50, (128, 1024), (4, 8), seed=2)
    assert all(128 <= i <= 1024 and 4 <= o <= 8 for i, o in a)


def test_short_names_resolve_to_the_shipped_configs(tmp_path, monkeypatch):
    configs = model_arg.shipped_configs()
    assert {"llama3-8b", "smollm2-135m"} <= configs.keys()
    path, shipped = model_arg.resolve_model("llama3-8b")
    assert shipped and path == str(configs["llama3-8b"])
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        model_arg.resolve_model("no-such-model")
    # An existing path of the same spelling wins over the short name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama3-8b").mkdir()
    assert model_arg.resolve_model("llama3-8b") == (str(tmp_path / "llama3-8b"), False)


def test_shipped_configs_have_the_real_shapes():
    llama = read_model_config(model_arg.shipped_configs()["llama3-8b"])
    assert (llama.hidden_size, llama.intermediate_size, llama.num_layers, llama.num_heads, llama.num_kv_heads,
            llama.head_dim, llama.vocab_size, llama.rope_theta, llama.max_position_embeddings,
            llama.tie_word_embeddings) == (4096, 14336, 32, 32, 8, 128, 128256, 500000.0, 8192, False)
    smol = read_model_config(model_arg.shipped_configs()["smollm2-135m"])
    assert (smol.hidden_size, smol.intermediate_size, smol.num_layers, smol.num_heads, smol.num_kv_heads,
            smol.head_dim, smol.vocab_size, smol.rope_theta, smol.max_position_embeddings, smol.tie_word_embeddings,
            smol.eos_token_ids) == (576, 1536, 30, 9, 3, 64, 49152, 100000.0, 8192, True, (2,))
    assert llama.architecture == smol.architecture == "LlamaForCausalLM"


def test_both_benchmarks_on_the_smollm2_config_with_dummy_weights(tmp_path):
    # The short name implies --load-format dummy: 135M random parameters at the real shapes, tiny workload.
    small = ["--model", "smollm2-135m", *CPU, "--max-model-len", "64", "--num-kv-blocks", "8"]
    lat = latency.main([*small, "--prompt-len", "8", "--output-len", "3", "--ttft-prompt-lens", "16",
                        "--repeats", "1", "--warmup", "0", "--json", str(tmp_path / "l.json")])
    assert lat["load_format"] == "dummy" and lat["model"] == "smollm2-135m"
    assert len(lat["decode"]["runs"]) == 1 and lat["ttft"][0]["prompt_len"] == 16
    tp = throughput.main([*small, "--num-requests", "2", "--input-len", "4", "8", "--output-len", "2", "4",
                          "--json", str(tmp_path / "t.json")])
    (run,) = tp["runs"]
    lengths = throughput.draw_lengths(2, (4, 8), (2, 4), seed=0)
    assert run["finished"] == 2 and run["output_tokens"] == sum(n for _, n in lengths)


def test_latency_refuses_runs_longer_than_the_context(tiny, tmp_path):
    with pytest.raises(SystemExit, match="max_model_len"):
        latency.main(["--model", str(tiny), *CPU, "--prompt-len", "250", "--output-len", "10",
                      "--ttft-prompt-lens", "--json", str(tmp_path / "x.json")])


def test_text_prompts_encode_to_about_the_drawn_length(smollm2_gguf):
    from benchmarks.stack_run import text_prompts
    from tokenizer_svc.loading import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    lengths = [1, 5, 32, 128, 700]
    prompts = text_prompts(tok, lengths, seed=0)
    for n, p in zip(lengths, prompts):
        assert p.token_ids == tok.encode_text(p.text)
        assert abs(len(p.token_ids) - n) <= max(1, n // 50), (n, len(p.token_ids))


def test_quantization_reaches_the_engine_config_and_the_stack_args():
    import argparse
    p = argparse.ArgumentParser()
    model_arg.add_engine_args(p)
    args = p.parse_args(["--model", "m", "--quantization", "int8"])
    assert model_arg.engine_config(args).quantization == "int8"
    assert model_arg.engine_cli_args(args)[-2:] == ["--quantization", "int8"]
    assert "--quantization" not in model_arg.engine_cli_args(p.parse_args(["--model", "m"]))
