"""Logprobs, prompt logprobs, n / best_of and beam search on a tiny random Llama (fp32, CPU), against transformers
run on the same weights: the same logprobs and top alternatives, the same beams with the same scores. n samples
share the prompt's blocks by reference count and are reproducible with a seed."""
from __future__ import annotations

import math

import pytest
import torch

from engine_svc.config import EngineConfig
from engine_svc.core.request import FinishReason, SamplingParams
from engine_svc.engine import Engine
from tests.engine.tiny_models import write_tiny_llama

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 9, 11, 13], [1, 2, 30, 31], [300, 301, 302, 303, 304, 305, 306, 307, 308]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-groups"), seed=7)


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base(tiny) -> Engine:
    return Engine(EngineConfig(model=str(tiny), device="cpu", dtype="float32", block_size=4, num_kv_blocks=128,
                               max_num_seqs=16, max_num_batched_tokens=64))


def collect(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]], on_step=None) -> dict:
    """request id -> index -> dict(tokens, finish, logprobs, cumulative, prompt_logprobs); also 'steps'."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    res: dict = {rid: {} for rid in requests}
    firsts: dict = {}
    while engine.has_work():
        outs = engine.step()
        for o in outs:
            firsts.setdefault(o.request_id, len(firsts))
            r = res[o.request_id].setdefault(o.index, dict(tokens=[], finish=None, logprobs=[], cumulative=None,
                                                             prompt_logprobs=None, step=engine.num_steps))
            r["tokens"] += o.new_token_ids
            r["logprobs"] += o.logprobs or []
            if o.prompt_logprobs is not None:
                r["prompt_logprobs"] = o.prompt_logprobs
            if o.finish_reason is not None:
                r["finish"], r["cumulative"] = o.finish_reason, o.cumulative_logprob
        if on_step is not None:
            on_step(engine)
    assert engine.check_integrity() == [] and engine.kv.num_used_blocks == 0
    return res


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("variant", [dict(), dict(max_num_batched_tokens=5, enable_prefix_caching=True)])
def test_logprobs_and_prompt_logprobs_equal_transformers(base, hf, variant):
    engine = base.with_scheduling(**variant)
    # The same prompt twice: with prefix caching on, the second must still score every prompt token.
    reqs = {f"r{i}": (p, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3,
                                        prompt_logprobs=2)) for i, p in enumerate(PROMPTS + [PROMPTS[0]])}
    res = collect(engine, reqs)
    for rid, (prompt, _) in reqs.items():
        out = res[rid][0]
        ref = hf_logprobs(hf, prompt + out["tokens"])
        assert len(out["logprobs"]) == 6
        for j, lp in enumerate(out["logprobs"]):
            row = ref[len(prompt) - 1 + j]
            assert lp.token_id == out["tokens"][j]
            assert math.isclose(lp.logprob, row[lp.token_id].item(), abs_tol=1e-4)
            top = row.topk(3)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        plp = out["prompt_logprobs"]
        assert [e.token_id for e in plp] == prompt[1:]
        for p, e in enumerate(plp, start=1):
            assert math.isclose(e.logprob, ref[p - 1, prompt[p]].item(), abs_tol=1e-4)
            assert [t for t, _ in e.top] == ref[p - 1].topk(2).indices.tolist()
        assert math.isclose(out["cumulative"], sum(lp.logprob for lp in out["logprobs"]), abs_tol=1e-4)


def test_n_samples_share_prompt_blocks_and_are_reproducible(base):
    engine = base.with_scheduling()
    prompt = PROMPTS[0]                            # 11 tokens: blocks of 4 -> 2 full prompt blocks to share
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=8, ignore_eos=True, n=3, best_of=3,
                            prompt_logprobs=1)
    seen = []

    def refcounts(e: Engine):
        members = e.scheduler.groups["s"].members if "s" in e.scheduler.groups else []
        if len(members) == 3 and all(m.status.value == "running" for m in members):
            first = members[0]
            seen.append([e.kv.pool.ref_count(b) for b in first.block_ids[:2]])
            assert all(m.block_ids[:2] == first.block_ids[:2] for m in members)
            assert len({m.block_ids[2] for m in members}) == 3   # each owns its partial block

    res = collect(engine, {"s": (prompt, params)}, refcounts)
    assert seen and seen[0] == [3, 3]
    assert sorted(res["s"]) == [0, 1, 2]
    assert len(res["s"][0]["prompt_logprobs"]) == len(prompt) - 1       # scored once, by member 0
    assert res["s"][1]["prompt_logprobs"] is None and res["s"][2]["prompt_logprobs"] is None
    outs = [res["s"][i]["tokens"] for i in range(3)]
    assert all(len(o) == 8 for o in outs) and len({tuple(o) for o in outs}) == 3
    again = collect(base.with_scheduling(), {"s": (prompt, params)})
    assert [again["s"][i]["tokens"] for i in range(3)] == outs
    # Member 0 draws exactly what a single request with the same seed draws.
    single = collect(base.with_scheduling(), {"one": (prompt, SamplingParams(temperature=1.0, seed=42, max_tokens=8,
                                                                               ignore_eos=True))})
    assert single["one"][0]["tokens"] == outs[0]


def test_best_of_returns_the_n_most_likely_at_the_end(base, hf):
    engine = base.with_scheduling()
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=6, ignore_eos=True, n=2, best_of=5)
    res = collect(engine, {"b": (PROMPTS[1], params)})
    outs = res["b"]
    assert sorted(outs) == [0, 1]
    assert outs[0]["step"] == outs[1]["step"]           # held back, then sent together
    assert outs[0]["cumulative"] >= outs[1]["cumulative"]
    for o in outs.values():
        ref = hf_logprobs(hf, PROMPTS[1] + o["tokens"])
        expected = sum(ref[len(PROMPTS[1]) - 1 + j, t].item() for j, t in enumerate(o["tokens"]))
        assert math.isclose(o["cumulative"], expected, abs_tol=1e-3)


def hf_beams(hf, prompt: list[int], width: int, n: int, max_new: int, length_penalty: float, eos: list[int]):
    out = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n, do_sample=False,
                      max_new_tokens=max_new, length_penalty=length_penalty, early_stopping=False,
                      eos_token_id=eos, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    beams = []
    for seq, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        gen = seq[len(prompt):]
        for j, t in enumerate(gen):
            if t in eos:
                gen = gen[:j + 1]
                break
        beams.append((gen, score))
    return beams


@pytest.mark.parametrize("width,n,length_penalty,use_stop", [(2, 2, 1.0, False), (3, 2, 0.5, True),
                                                              (4, 4, 1.0, True), (3, 1, 2.0, True)])
def test_beam_search_equals_transformers(base, hf, width, n, length_penalty, use_stop):
    prompt = PROMPTS[0]
    stop = []
    if use_stop:
        # A token the model likes to produce, made an extra EOS so that hypotheses finish early.
        greedy = collect(base.with_scheduling(), {"g": (prompt, SamplingParams(temperature=0.0, max_tokens=10,
                                                                               ignore_eos=True))})
        stop = [greedy["g"][0]["tokens"][3]]
    params = SamplingParams(temperature=0.0, max_tokens=10, n=n, best_of=width, use_beam_search=True,
                            length_penalty=length_penalty, stop_token_ids=frozenset(stop))
    res = collect(base.with_scheduling(), {"beam": (prompt, params)})
    expected = hf_beams(hf, prompt, width, n, 10, length_penalty, [2] + stop)
    got = [res["beam"][i] for i in range(n)]
    assert [g["tokens"] for g in got] == [e[0] for e in expected]
    for g, (tokens, score) in zip(got, expected):
        assert math.isclose(g["cumulative"] / len(tokens) ** length_penalty, score, abs_tol=1e-4)
        ends_on_stop = tokens[-1] in [2] + stop
        assert g["finish"] is (FinishReason.STOP_TOKEN if ends_on_stop else FinishReason.LENGTH)
    if use_stop and n > 1:   # a hypothesis ended on the stop token next to ones cut by length
        assert {g["finish"] for g in got} == {FinishReason.STOP_TOKEN, FinishReason.LENGTH}


def test_beams_share_blocks_and_abort_frees_everything(base):
    engine = base.with_scheduling()
    engine.add_request("beam", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=20, n=2, best_of=4,
                                                          use_beam_search=True, ignore_eos=True))
    shared = False
    for _ in range(6):
        engine.step()
        members = engine.scheduler.groups["beam"].members
        first_blocks = [engine.kv.pool.ref_count(b) for b in members[0].block_ids[:2]]
        shared |= len(members) == 4 and first_blocks == [4, 4]
    assert shared                                       # all four beams hold the prompt's two full blocks
    assert engine.abort("beam")
    assert engine.kv.num_used_blocks == 0 and engine.check_integrity() == [] and not engine.scheduler.groups


def test_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="temperature must be 0"):
        SamplingParams(temperature=0.7, use_beam_search=True, best_of=2)
