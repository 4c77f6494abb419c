"""`tandem prune` on a tiny random Llama: Wanda's layer-wise choices against a reference taken from transformers'
activations, the checkpoint's round trip (safetensors, config.json, transformers loading it dense), and the
engine serving it dense with transformers' greedy tokens."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine_svc.pruning.checkpoint_writer import decoder_linear
from engine_svc.pruning.prune_command import main as prune_main
from engine_svc.pruning.prune_command import run_prune
from engine_svc.pruning.sparsity_config import parse_sparsity_config
from engine_svc.pruning.spec import parse_sparsity
from tests.pruning.tiny_checkpoints import CALIB_TEXT, prune_config, write_tiny_source


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_source(tmp_path_factory.mktemp("tiny-source"))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


@pytest.fixture(scope="module")
def wanda24(source, calib, tmp_path_factory):
    config = prune_config(source, tmp_path_factory.mktemp("out") / "wanda24", "wanda", "2:4", calib)
    return config, run_prune(config)


def _calibration_inputs(model_dir, windows) -> dict[str, torch.Tensor]:
    """Every decoder linear's inputs in transformers, over all windows (each its own sequence), by HF module."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0][0]))
               for name, m in model.named_modules() if decoder_linear(name + ".weight")]
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    for h in handles:
        h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def test_wanda_prunes_the_smallest_weight_times_input_norm_of_the_layerwise_pruned_model(wanda24, source):
    """Pruned layer by layer, each linear's inputs are those of the finished pruned model (every linear before it
    is pruned already when the calibration reaches it). So: run the written checkpoint in transformers, take each
    linear's input norms there, and the kept half of every group of 4 must hold the largest |W_source| * norm."""
    from engine_svc.pruning.calibration import calibration_windows

    config, _ = wanda24
    windows = calibration_windows(source, config.calib_text.read_text(), config.calib_tokens, config.calib_window)
    assert sum(len(w) for w in windows) == config.calib_tokens == 300
    inputs = _calibration_inputs(config.output, windows)
    before, after = load_file(source / "model.safetensors"), load_file(config.output / "model.safetensors")
    checked = 0
    for name, x in inputs.items():
        w = before[name + ".weight"]
        metric = (w.abs() * x.pow(2).sum(0).sqrt()).reshape(w.shape[0], -1, 4)
        kept = (after[name + ".weight"] != 0).reshape(metric.shape)
        assert bool((kept.sum(-1) == 2).all()), name
        lowest_kept = metric.masked_fill(~kept, float("inf")).amin(-1)
        highest_pruned = metric.masked_fill(kept, -float("inf")).amax(-1)
        # Strictly ordered up to float32 rounding of the norms (engine and transformers sum in other orders).
        assert bool((highest_pruned <= lowest_kept * (1 + 1e-5)).all()), name
        checked += 1
    assert checked == 2 * 7   # q, k, v, o, gate, up, down in each of the 2 layers


def test_the_checkpoint_round_trips_and_transformers_loads_it_dense(wanda24, source):
    from transformers import AutoModelForCausalLM

    config, result = wanda24
    assert result["pruned_layers"] == 14 and result["zero_fraction"] == 0.5 and result["shards"] == ["model.safetensors"]
    before, after = load_file(source / "model.safetensors"), load_file(config.output / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in after.items():
        if decoder_linear(name):
            assert torch.equal(tensor, torch.where(tensor != 0, before[name], 0)), name   # zeros, else untouched
        else:
            assert torch.equal(tensor, before[name]), name
    written = json.loads((config.output / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "sparsity_config"} == original
    sparsity = parse_sparsity_config(written)
    assert (sparsity.spec, sparsity.method) == (parse_sparsity("2:4"), "wanda")
    assert set(sparsity.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert written["sparsity_config"]["calibration"] == {"text": "calib.txt", "tokens": 300, "window": 128}
    assert (config.output / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    hf = AutoModelForCausalLM.from_pretrained(config.output, torch_dtype=torch.float32)
    state = hf.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in after.items())


def test_the_engine_serves_the_pruned_checkpoint_dense_with_transformers_greedy_tokens(wanda24):
    from transformers import LlamaForCausalLM

    from engine_svc.config import EngineConfig
    from engine_svc.core.request import SamplingParams
    from engine_svc.engine import Engine

    config, _ = wanda24
    prompts = [[1, 70, 108, 105, 99, 101], [1, 84, 104, 101, 32, 82, 97, 98, 98, 105, 116, 32]]
    engine = Engine(EngineConfig(model=str(config.output), device="cpu", dtype="float32", num_kv_blocks=32,
                                 enable_prefix_caching=False))
    assert engine.runner.model.model.layers[0].mlp.gate_up_proj.weight.eq(0).float().mean() == 0.5
    ours = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    hf = LlamaForCausalLM.from_pretrained(config.output, torch_dtype=torch.float32).eval()
    for prompt, got in zip(prompts, ours):
        ids = list(prompt)
        with torch.no_grad():   # plain argmax decoding: generate()'s min_new_tokens would also suppress EOS
            for _ in range(16):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        assert got == ids[len(prompt):]


def test_magnitude_needs_no_calibration_and_zeroes_the_fraction_of_each_row(source, tmp_path):
    config = prune_config(source, tmp_path / "mag50", "magnitude", "0.5", tmp_path / "no-such-text")
    result = run_prune(config)
    after, before = load_file(config.output / "model.safetensors"), load_file(source / "model.safetensors")
    for name, tensor in after.items():
        if decoder_linear(name):
            assert bool(((tensor == 0).sum(-1) == tensor.shape[1] // 2).all())
            kept_min = before[name].abs().masked_fill(tensor == 0, float("inf")).amin(-1)
            pruned_max = before[name].abs().masked_fill(tensor != 0, -1).amax(-1)
            assert bool((pruned_max <= kept_min).all())
    sparsity = json.loads((config.output / "config.json").read_text())["sparsity_config"]
    assert (sparsity["structure"], sparsity["sparsity"], "calibration" in sparsity) == ("unstructured", 0.5, False)
    assert result["zero_fraction"] == 0.5


def test_the_calibration_engine_holds_the_checkpoint_values_exactly():
    from engine_svc.pruning.calibration import calibration_dtype
    assert calibration_dtype("bfloat16", "cpu") == calibration_dtype(None, "cpu") == "float32"
    if torch.cuda.is_available():
        assert calibration_dtype("bfloat16", "cuda") == "bfloat16" and calibration_dtype("float32", "cuda") == "float32"


def test_bad_input_gets_one_line_not_a_traceback(source, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert prune_main(["--model", str(source), "--output", out, "--sparsity", "half"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --sparsity must be N:M (e.g. 2:4) or a fraction in (0, 1) "
                                               "(e.g. 0.5), got 'half'")
    assert prune_main(["--model", str(tmp_path / "nothing"), "--output", out]) == 1
    assert "error: no model at" in capsys.readouterr().err
    assert prune_main(["--model", str(source), "--output", str(source)]) == 1
    assert "must differ from the input" in capsys.readouterr().err
    (tmp_path / "no-tokenizer").mkdir()
    (tmp_path / "no-tokenizer" / "config.json").write_bytes((source / "config.json").read_bytes())
    assert prune_main(["--model", str(tmp_path / "no-tokenizer"), "--output", out]) == 1
    assert "no tokenizer to encode the calibration text with" in capsys.readouterr().err
