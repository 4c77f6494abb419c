"""Pipeline parallelism on the CPU (gloo, worker processes): tiny random checkpoints split into 2 stages (alone, and
with 2 tensor-parallel ranks per stage: 4 processes) give the single-process engine's logits within 1e-4 in fp32
and the same tokens over 32 steps with chunked prefill, a prefix-cache hit, preemption and n > 1 in the run, with
two batches in flight.

Each case starts its workers once (module-scoped fixture; one process group per test process at a time, so the
cases run one after the other)."""
from __future__ import annotations

import json

import pytest

from engine_svc.config import EngineConfig, config_from_args
from engine_svc.core.request import FinishReason, SamplingParams
from engine_svc.distributed.pipeline import PipelineStage, rank_of, stage_of
from engine_svc.engine import Engine
from engine_svc.worker.model_runner import ModelRunner
from tests.engine.family_checks import PROMPTS, assert_same_stepped_logits, run_mixed, single_and_parallel
from tests.engine.test_family_falcon import write_tiny_falcon
from tests.engine.tiny_models import write_tiny_family

# name -> (family, tensor-parallel ranks per stage, stages, config overrides)
CASES = {
    # 3 layers over 2 stages (2 + 1); tied embeddings: stage 0 embeds, the last stage reads the same tensor as its
    # own lm_head.
    "llama-tied-p2": ("llama", 1, 2, dict(num_hidden_layers=3, tie_word_embeddings=True)),
    # 4 layers, 2 stages of 2 tensor-parallel ranks, each rank holding one of 2 K/V heads.
    "llama-t2p2": ("llama", 2, 2, dict(num_hidden_layers=4)),
    # The window applies in each stage's layers alike.
    "mistral-window-p2": ("mistral", 1, 2, dict(sliding_window=5)),
    # q/k/v bias; 2 stages of 2 tensor-parallel ranks, 3 K/V heads split unevenly within each stage.
    "qwen2-t2p2": ("qwen2", 2, 2, dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96)),
    # q/k norms per head.
    "qwen3-p2": ("qwen3", 1, 2, dict(head_dim=16)),
    # Falcon-7B's layout: multi-query (the one K/V head replicated on both ranks of a stage), parallel attention
    # and MLP, tied embeddings; one stream (the hidden states) between stages.
    "falcon-mq-t2p2": ("falcon", 2, 2, dict(multi_query=True, parallel_attn=True, bias=True, num_hidden_layers=3)),
    "falcon-mha-sequential-p2": ("falcon", 1, 2, dict(multi_query=False, parallel_attn=False, bias=True,
                                                      tie_word_embeddings=False)),
}
# architecture -> (prefix of the decoder layers, of the embedding, the last stage's tensors)
NAMES = {"FalconForCausalLM": ("transformer.h.", "transformer.word_embeddings",
                               ("lm_head.weight", "transformer.ln_f.weight"))}
LLAMA_NAMES = ("model.layers.", "model.embed_tokens", ("lm_head.weight", "model.norm.weight"))


def write_checkpoint(path, family: str, **overrides):
    if family == "falcon":
        return write_tiny_falcon(path, seed=3, **overrides)
    return write_tiny_family(path, family, seed=3, **overrides)


@pytest.fixture(scope="module", params=sorted(CASES))
def engines(request, tmp_path_factory):
    """(single-process engine, pipeline-parallel engine) over the same checkpoint."""
    family, tp, pp, overrides = CASES[request.param]
    path = write_checkpoint(tmp_path_factory.mktemp(request.param), family, **overrides)
    with single_and_parallel(path, tensor_parallel_size=tp, pipeline_parallel_size=pp) as pair:
        yield pair


def test_prefill_and_decode_logits_equal_single_process(engines):
    assert_same_stepped_logits(*engines)


def test_tokens_equal_single_process_with_chunking_prefix_hits_preemption_and_n(engines):
    single, parallel = engines
    expected, *_ = run_mixed(single)
    assert len(expected) == 5 and all(len(t) == 32 for t in expected.values())
    parallel.runner.peak_steps_in_flight = 0
    tokens, preemptions, hits = run_mixed(parallel)
    assert preemptions > 0 and hits > 0        # the pipelined run exercises what it claims to
    assert tokens == expected
    assert parallel.runner.peak_steps_in_flight == 2


def run_features(engine: Engine) -> dict:
    """Beam search, logprobs with prompt logprobs, a repetition penalty and seeded top-p sampling side by side:
    every output id, logprob and prompt logprob by (request, index)."""
    e = engine.with_scheduling()
    requests = {
        "beam": (PROMPTS[0], SamplingParams(temperature=0.0, use_beam_search=True, best_of=3, n=2, max_tokens=8)),
        "logprobs": (PROMPTS[1], SamplingParams(temperature=0.0, logprobs=2, prompt_logprobs=1, max_tokens=8,
                                                ignore_eos=True)),
        "penalty": (PROMPTS[2], SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=8,
                                               ignore_eos=True)),
        "seeded": ([4, 5, 6], SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=8, ignore_eos=True)),
    }
    for rid, (prompt, params) in requests.items():
        e.add_request(rid, prompt, params)
    got: dict = {}
    while e.has_work():
        for o in e.step():
            entry = got.setdefault((o.request_id, o.index), {"ids": [], "logprobs": [], "prompt": []})
            entry["ids"] += o.new_token_ids
            for key, lps in (("logprobs", o.logprobs), ("prompt", o.prompt_logprobs)):
                entry[key] += [(lp.token_id, lp.logprob, lp.top) for lp in lps or () if lp]
    return got


def test_beam_search_logprobs_penalties_and_seeds_equal_single_process(engines):
    single, parallel = engines
    expected = run_features(single)
    assert len(expected) == 5 and expected[("logprobs", 0)]["prompt"]
    got = run_features(parallel)
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        assert got[key]["ids"] == want["ids"]
        for kind in ("logprobs", "prompt"):
            assert _ids(got[key][kind]) == _ids(want[kind])
            assert _values(got[key][kind]) == pytest.approx(_values(want[kind]), abs=1e-4)


def _ids(entries) -> list:
    return [(token, [i for i, _ in top]) for token, _, top in entries]


def _values(entries) -> list[float]:
    return [v for _, logprob, top in entries for v in (logprob, *(v for _, v in top))]


def test_two_batches_are_in_flight_and_split_the_requests(engines):
    """Four requests over 2 stages with max_num_seqs 2: the engine launches a second batch (the other two
    requests) before it waits for the first, so the driver runs the last stage of one while stage 0 runs the
    other; max_num_seqs bounds each batch, so all four run at once."""
    single, parallel = engines
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = PROMPTS + [[7, 8, 9, 10]]
    expected = single.with_scheduling().generate(prompts, greedy)   # fresh caches: the KV tensors are shared
    e = parallel.with_scheduling(max_num_seqs=2)
    for i, p in enumerate(prompts):
        e.add_request(f"r{i}", p, greedy)
    sizes = []
    launch = e.executor.launch

    def watched(out):
        sizes.append(len(out.scheduled))
        return launch(out)

    e.executor.launch = watched
    e.runner.peak_steps_in_flight = 0
    outputs: dict = {f"r{i}": [] for i in range(len(prompts))}
    try:
        while e.has_work():
            for o in e.step():
                outputs[o.request_id].extend(o.new_token_ids)
    finally:
        e.executor.launch = launch
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == expected
    assert e.runner.peak_steps_in_flight == 2
    assert sizes[:2] == [2, 2] and max(sizes) == 2   # two batches of two from the start, never one of four


def test_a_failed_step_with_batches_in_flight_keeps_the_stages_in_step(engines):
    """A failure outside the executor (here the scheduler) fails the requests, and the driver still runs the last
    stage of the batch in flight, so the next requests meet every stage in step."""
    single, parallel = engines
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = PROMPTS + [[7, 8, 9, 10]]
    e = parallel.with_scheduling()
    for i, p in enumerate(prompts):
        e.add_request(f"r{i}", p, greedy)
    e.step()
    assert len(e._in_flight) == 1     # two launched, the oldest finished

    def broken(*_a, **_k):
        raise RuntimeError("a scheduler bug")

    e.scheduler.schedule = broken
    failed = e.step()
    del e.scheduler.schedule
    assert sorted(o.request_id for o in failed) == [f"r{i}" for i in range(len(prompts))]
    assert all(o.finish_reason is FinishReason.FAILED for o in failed) and not e.has_work()
    assert e.generate(prompts, greedy) == single.with_scheduling().generate(prompts, greedy)


def test_each_rank_holds_only_its_stage(engines):
    _, parallel = engines
    runner = parallel.runner
    layers, embedding, last = NAMES.get(parallel.model_cfg.architecture, LLAMA_NAMES)
    start, stop = runner.layers
    assert stop == parallel.model_cfg.num_layers and start > 0          # the driver holds the last stage
    assert len(runner.kv_caches) == stop - start                        # and caches only its layers' K/V
    names = {n for n, _ in runner.model.named_parameters()}
    assert not any(n.startswith(embedding) for n in names)
    held = {int(n.removeprefix(layers).split(".")[0]) for n in names if n.startswith(layers)}
    assert held == set(range(start, stop))
    assert set(last) <= names


def test_layers_split_evenly_with_the_first_stages_taking_the_rest():
    assert [PipelineStage(s, 4).layer_range(30) for s in range(4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert [PipelineStage(s, 2).layer_range(3) for s in range(2)] == [(0, 2), (2, 3)]
    with pytest.raises(ValueError, match="pipeline-parallel-size 3 exceeds the model's 2 layers"):
        PipelineStage(0, 3).layer_range(2)


def test_rank_layout_puts_the_last_stage_on_the_driver():
    # T=2, P=3: ranks 0-1 last stage, 2-3 stage 0, 4-5 stage 1.
    assert [stage_of(r, 2, 3) for r in range(6)] == [2, 2, 0, 0, 1, 1]
    assert [rank_of(s, t, 2, 3) for s in range(3) for t in range(2)] == [2, 3, 4, 5, 0, 1]
    assert [stage_of(r, 4, 1) for r in range(4)] == [0, 0, 0, 0]        # P = 1: plain tensor parallelism
    stage1 = PipelineStage(1, 3, tp_rank=1, tp_size=2)
    assert (stage1.prev_rank, stage1.next_rank) == (3, 1)


def test_a_family_without_stages_is_refused_by_name(tmp_path, monkeypatch):
    from engine_svc.models.falcon import FalconForCausalLM
    monkeypatch.setattr(FalconForCausalLM, "supports_pipeline_parallel", False)   # every family has stages today
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["FalconForCausalLM"], model_type="falcon", vocab_size=320, hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True, layer_norm_epsilon=1e-5)))
    config = EngineConfig(model=str(tmp_path), load_format="dummy", device="cpu", pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="FalconForCausalLM is not supported with --pipeline-parallel-size > 1"):
        ModelRunner(config, pp=PipelineStage(1, 2))


def test_engine_option_parses_and_is_checked():
    cfg = config_from_args(["--model", "m", "--pipeline-parallel-size", "2", "--tensor-parallel-size", "2"])
    assert (cfg.pipeline_parallel_size, cfg.world_size) == (2, 4)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be >= 1"):
        config_from_args(["--model", "m", "--pipeline-parallel-size", "0"])
