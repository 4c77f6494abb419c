"""Asynchronous scheduling: step k+1 is scheduled before step k's sampled ids are known.

On exact scheduler state: placeholders stand for pending ids, decode steps are granted on them, real ids replace
them, a request ending on EOS drops its one extra step, one ending by length is not scheduled again, a preempted
request waits for its pending id, and no block hash ever covers a placeholder. Then on a tiny Llama: outputs are the
same as with synchronous scheduling for greedy, seeded, stop-token, min_tokens, penalty and aborted requests, through
chunking, prefix caching and preemption, and every block is free afterwards. Penalized requests keep asynchronous
scheduling on (their counts live on the device) and give the tokens of the host-history path that forced it off."""
from __future__ import annotations

import pytest
import torch

from engine_svc.config import EngineConfig
from engine_svc.core.block_hash import extend_block_hashes
from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import PLACEHOLDER, FinishReason, RequestStatus, SamplingParams
from engine_svc.core.scheduler import Scheduler, SchedulerConfig
from engine_svc.engine import Engine
from engine_svc.sampling.logits_processors import penalties_of_histories
from engine_svc.sampling.sampler import padded, penalty_values
from tests.engine.tiny_models import write_tiny_llama

EOS = 99


def make(num_blocks=16, block_size=4, max_model_len=32, caching=False):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=max_model_len),
                     kv, frozenset({EOS}))


def plan(out):
    return [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in out.scheduled]


def launch(s):
    out = s.schedule()
    s.mark_in_flight(out)
    return out


def test_decode_is_granted_on_a_placeholder_then_the_real_id_replaces_it():
    s = make()
    s.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=10))
    a = s.requests["a"]
    out1 = launch(s)
    assert plan(out1) == [("a", 0, 5, True)]
    assert a.token_ids == [1, 2, 3, 4, 5, PLACEHOLDER] and a.num_computed_tokens == 5
    out2 = launch(s)                                   # before step 1's id is known
    assert plan(out2) == [("a", 5, 1, True)]
    assert a.token_ids == [1, 2, 3, 4, 5, PLACEHOLDER, PLACEHOLDER] and a.num_computed_tokens == 6
    res = s.update(out1, [7])
    assert [(r.request_id, r.new_token_ids, r.finish_reason) for r in res] == [("a", [7], None)]
    assert a.token_ids == [1, 2, 3, 4, 5, 7, PLACEHOLDER]
    out3 = launch(s)
    assert plan(out3) == [("a", 6, 1, True)]
    s.update(out2, [8])
    s.update(out3, [9])
    assert a.token_ids == [1, 2, 3, 4, 5, 7, 8, 9] and a.block_ids == [0, 1]


def test_eos_drops_the_extra_step_and_frees_blocks_at_once():
    s = make()
    s.add_request("a", [1, 2, 3], SamplingParams(max_tokens=10))
    a = s.requests["a"]
    out1 = launch(s)
    out2 = launch(s)
    res = s.update(out1, [EOS])
    assert [(r.new_token_ids, r.finish_reason) for r in res] == [([EOS], FinishReason.STOP_TOKEN)]
    assert s.requests == {} and s.kv.pool.num_free == 16
    assert s.update(out2, [5]) == []                   # the extra step's id goes nowhere
    assert s.schedule().is_empty and not s.has_work

    assert a.token_ids == [1, 2, 3, EOS]               # the extra step's placeholder went with it


def test_best_of_ranks_members_without_the_extra_steps_placeholder():
    """best_of > n sends each member's whole output when all have finished: a member that ended on EOS while its
    next step ran must not send that step's placeholder (it reached the client as token id -1 and broke the
    engine's output stream)."""
    s = make()
    s.add_request("g", [1, 2, 3], SamplingParams(max_tokens=5, best_of=2))
    out1 = launch(s)                                   # member 0 computes the prompt
    out2 = launch(s)                                   # and decodes on its placeholder
    assert s.update(out1, [EOS]) == []                 # member 0 ends; member 1 may join now
    out3 = launch(s)
    assert s.update(out2, [5]) == []
    res = s.update(out3, [EOS])
    assert [(r.new_token_ids, r.finish_reason) for r in res] == [([EOS], FinishReason.STOP_TOKEN)]
    assert s.requests == {} and s.kv.pool.num_free == 16


def test_a_request_ending_by_length_is_not_scheduled_again():
    s = make()
    s.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2))
    s.add_request("b", [4, 5], SamplingParams(max_tokens=10))
    out1 = launch(s)
    out2 = launch(s)
    assert plan(out2) == [("a", 3, 1, True), ("b", 2, 1, True)]
    out3 = launch(s)                                   # a's two outputs are both pending: only b goes on
    assert plan(out3) == [("b", 3, 1, True)]
    s.update(out1, [10, 20])
    res = s.update(out2, [11, 21])
    assert [(r.request_id, r.finish_reason) for r in res] == [("a", FinishReason.LENGTH), ("b", None)]
    assert "a" not in s.requests and s.requests["b"].token_ids == [4, 5, 20, 21, PLACEHOLDER]


def test_context_limit_counts_the_pending_token():
    s = make(max_model_len=6)
    s.add_request("a", [1, 2, 3, 4], SamplingParams(max_tokens=10))
    out1 = launch(s)
    out2 = launch(s)                                   # position 5 is the last the context holds
    assert launch(s).is_empty
    s.update(out1, [7])
    res = s.update(out2, [8])
    assert res[0].finish_reason is FinishReason.LENGTH and s.requests == {}


def test_preempted_request_waits_for_its_pending_id():
    s = make(num_blocks=4, block_size=2, max_model_len=8)
    short = SamplingParams(max_tokens=4)
    s.add_request("a", [1, 2, 3, 4], short)
    s.add_request("b", [4, 5, 6, 7], short)
    out1 = launch(s)                                   # a: blocks 0-1, b: blocks 2-3; the pool is empty
    out2 = launch(s)                                   # a's decode needs a 3rd block: b (the newest) goes
    b = s.requests["b"]
    assert out2.preempted == [b] and b.status is RequestStatus.WAITING and b.token_ids[-1] == PLACEHOLDER
    assert plan(out2) == [("a", 4, 1, True)]
    s.update(out1, [10, 20])
    assert b.token_ids == [4, 5, 6, 7, 20] and b.num_computed_tokens == 0
    s.update(out2, [11])
    out3 = launch(s)
    assert [p[0] for p in plan(out3)] == ["a"]         # no blocks for b yet


def test_placeholder_never_enters_a_block_hash():
    s = make(block_size=2, caching=True)
    s.add_request("a", [1, 2, 3], SamplingParams(max_tokens=10))
    a = s.requests["a"]
    out1 = launch(s)                                   # tokens [1, 2, 3, P]: the 2nd block ends with P
    s.kv.find_cached_blocks(a)                         # forces hashing of every hashable block
    assert len(a.block_hashes) == 1
    s.update(out1, [4])
    launch(s)
    expected: list[bytes] = []
    extend_block_hashes(expected, [1, 2, 3, 4], 2)
    assert a.block_hashes == expected


def test_abort_between_launch_and_update_drops_the_output():
    s = make()
    s.add_request("a", [1, 2, 3], SamplingParams(max_tokens=10))
    out1 = launch(s)
    assert s.abort("a")
    assert s.kv.pool.num_free == 16 and s.update(out1, [7]) == []


# --- engine ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Engine:
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny-async"), seed=5)
    return Engine(EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=4, num_kv_blocks=256,
                               max_num_seqs=8, max_num_batched_tokens=64))


def requests():
    prompts = [[(11 * i + 7 * j) % 300 + 10 for j in range(5 + 3 * i)] for i in range(8)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=3, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=14),
        SamplingParams(temperature=0.8, top_k=20, seed=11, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=1.0, seed=5, max_tokens=12, min_tokens=4),
        SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=8, max_tokens=11, ignore_eos=True),
    ]
    return prompts, params


def run(engine: Engine, stop_ids: frozenset[int] = frozenset()) -> dict[str, tuple[list[int], object]]:
    prompts, params = requests()
    result: dict[str, tuple[list[int], object]] = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        if stop_ids and i in (0, 6):
            sp = SamplingParams(temperature=0.0, max_tokens=sp.max_tokens, stop_token_ids=stop_ids)
        engine.add_request(f"r{i}", p, sp)
        result[f"r{i}"] = ([], None)
    steps = 0
    while engine.has_work():
        for o in engine.step():
            result[o.request_id][0].extend(o.new_token_ids)
            if o.finish_reason is not None:
                result[o.request_id] = (result[o.request_id][0], o.finish_reason)
        steps += 1
        if steps == 4:
            engine.abort("r7")
    assert engine.check_integrity() == [] and engine.kv.num_used_blocks == 0
    return result


def assert_same(asyn: dict, sync: dict) -> None:
    # r7 is aborted after the 4th step() call; async outputs arrive one call later, so it may have one fewer.
    (a7, a_fin), (s7, s_fin) = asyn.pop("r7"), sync.pop("r7")
    assert a_fin is None and s_fin is None and a7 == s7[:len(a7)] and len(s7) - len(a7) <= 1
    assert asyn == sync


@pytest.mark.parametrize("variant", [
    dict(),
    dict(enable_chunked_prefill=True, max_num_batched_tokens=7, enable_prefix_caching=True),
    dict(num_kv_blocks=20),
])
def test_async_outputs_equal_sync(base, variant):
    sync = run(base.with_scheduling(async_scheduling=False, **variant))
    engine = base.with_scheduling(async_scheduling=True, **variant)
    assert engine.async_scheduling
    assert_same(run(engine), sync)
    if variant.get("num_kv_blocks"):
        assert engine.scheduler.num_preemptions > 0


def test_async_stop_token_ids_end_outputs_as_in_sync(base):
    # Stop ids picked from the greedy continuation itself, so they do fire mid-generation.
    first = run(base.with_scheduling(async_scheduling=False))["r0"][0]
    stop = frozenset({first[3]})
    sync = run(base.with_scheduling(async_scheduling=False), stop)
    assert_same(run(base.with_scheduling(async_scheduling=True), stop), sync)
    assert sync["r0"][1] is FinishReason.STOP_TOKEN and len(sync["r0"][0]) <= 4


# --- penalties on the device keep asynchronous scheduling on ---------------------------------------------------------

class HostPenalties:
    """The path before the counts moved to the device: each step's counts made from the ids on the host, so the
    engine had to wait for them."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def penalties(self, requests):
        rows = [i for i, r in enumerate(requests) if r.params.uses_penalties]
        if not rows:
            return None
        chosen = [requests[i] for i in rows]
        cpu = torch.device("cpu")
        p = penalties_of_histories(padded([r.prompt_token_ids for r in chosen], cpu),
                                   padded([r.output_token_ids for r in chosen], cpu),
                                   *penalty_values([r.params for r in chosen], cpu), self.vocab_size)
        p.rows = torch.tensor(rows)
        return p

    def count(self, sampled) -> None:
        pass

    def needs_real_ids(self, req) -> bool:
        return True


def penalized_requests():
    prompts = [[(13 * i + 5 * j) % 300 + 10 for j in range(4 + 5 * i)] for i in range(6)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=14, repetition_penalty=1.6, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, presence_penalty=1.5, frequency_penalty=0.8),
        SamplingParams(temperature=0.9, seed=2, max_tokens=13, frequency_penalty=2.0, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, top_k=30, max_tokens=15, repetition_penalty=0.7,
                       presence_penalty=-0.5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=11, repetition_penalty=1.2, min_tokens=3),
    ]
    return prompts, params


def run_penalized(engine: Engine) -> tuple[dict[str, list[int]], int]:
    """Outputs by request, and how many times a penalized request was scheduled on an id still in flight."""
    on_placeholder = 0
    schedule = engine.scheduler.schedule

    def spying_schedule(*args, **kw):
        nonlocal on_placeholder
        out = schedule(*args, **kw)
        on_placeholder += sum(s.request.params.uses_penalties and s.request.has_placeholder for s in out.scheduled)
        return out

    engine.scheduler.schedule = spying_schedule
    result = {f"p{i}": [] for i in range(6)}
    for i, (p, sp) in enumerate(zip(*penalized_requests())):
        engine.add_request(f"p{i}", p, sp)
    while engine.has_work():
        for o in engine.step():
            result[o.request_id].extend(o.new_token_ids)
    assert engine.check_integrity() == [] and engine.kv.num_used_blocks == 0
    return result, on_placeholder


@pytest.mark.parametrize("variant", [dict(), dict(enable_chunked_prefill=True, max_num_batched_tokens=7),
                                     dict(num_kv_blocks=20)])
def test_penalties_stay_asynchronous_and_give_the_host_paths_tokens(base, variant, monkeypatch):
    monkeypatch.setattr(base.runner, "penalties", HostPenalties(base.model_cfg.vocab_size))
    reference, _ = run_penalized(base.with_scheduling(async_scheduling=False, **variant))
    monkeypatch.undo()
    engine = base.with_scheduling(async_scheduling=True, **variant)
    outputs, on_placeholder = run_penalized(engine)
    assert outputs == reference
    assert all(len(o) >= 3 for o in outputs.values())
    # Decode steps of penalized requests were granted before their last id was known: no wait for real ids.
    assert on_placeholder >= 20
    if variant.get("num_kv_blocks"):
        assert engine.scheduler.num_preemptions > 0
