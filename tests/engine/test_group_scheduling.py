"""Request groups in the plain-Python scheduler, on exact state: best_of members join once member 0 has computed the
prompt and share its full prompt blocks; a beam search holds its full width in seats, forks share their parent's
full computed blocks, beams not chosen are dropped, its rows never carry a placeholder, and the group is forgotten
with no block used once its result is out."""
from __future__ import annotations

import pytest

from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.outputs import RequestOutput
from engine_svc.core.request import PLACEHOLDER, FinishReason, RequestStatus, SamplingParams, TokenLogprob
from engine_svc.core.scheduler import Scheduler, SchedulerConfig


def make(seqs: int) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=64, max_model_len=64),
                     KVCacheManager(32, 4), frozenset({99}))


def plan(out):
    return [(x.request.request_id, x.start, x.num_new_tokens) for x in out.scheduled]


def top(*candidates):
    """A beam row's result: its candidates (token, logprob), best first."""
    return TokenLogprob(candidates[0][0], candidates[0][1], tuple(candidates))


def test_best_of_members_join_after_member_0_on_its_full_prompt_blocks():
    s = make(seqs=4)
    s.add_request("g", list(range(1, 11)), SamplingParams(max_tokens=2, n=3, best_of=3, seed=1))   # 2 full blocks
    out = s.schedule()
    assert plan(out) == [("g#0", 0, 10)] and list(s.requests) == ["g#0"]
    assert s.update(out, [7]) == [RequestOutput("g", [7], None, 0)]
    out = s.schedule()
    assert plan(out) == [("g#0", 10, 1), ("g#1", 8, 2), ("g#2", 8, 2)]
    first, second, third = (s.requests[f"g#{i}"] for i in range(3))
    assert second.block_ids[:2] == third.block_ids[:2] == first.block_ids[:2]
    assert [s.kv.pool.ref_count(b) for b in first.block_ids] == [3, 3, 1]
    assert s.kv.prefix_stats.queries == 10 and s.check_integrity() == []   # only member 0 looked the prompt up
    assert [o.index for o in s.update(out, [8, 5, 6])] == [0, 1, 2]
    out = s.schedule()
    assert plan(out) == [("g#1", 10, 1), ("g#2", 10, 1)]
    assert s.update(out, [9, 9])[-1].last and not s.groups and not s.requests
    assert s.kv.num_used_blocks == 0 and s.check_integrity() == []


def test_a_beam_search_holds_its_width_and_its_forks_share_the_parents_blocks():
    s = make(seqs=3)
    s.add_request("beam", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=3, temperature=0.0, use_beam_search=True,
                                                              best_of=2))
    s.add_request("x", [1, 2, 3], SamplingParams(max_tokens=5))
    s.add_request("y", [4, 5, 6], SamplingParams(max_tokens=5))
    out = s.schedule()
    assert plan(out) == [("beam#beam0", 0, 6), ("x", 0, 3)]   # the beam holds 2 of the 3 seats: y waits
    assert s.update(out, [7, 30], [top((7, -0.1), (8, -0.2)), None]) == [RequestOutput("x", [30], None, 0)]
    beam0, beam1 = s.groups["beam"].members   # both candidates survive: beam0 takes 7, its fork beam1 takes 8
    assert beam0.output_token_ids == [7] and beam1.output_token_ids == [8]
    assert beam1.status is RequestStatus.RUNNING and beam1.num_computed_tokens == 4
    assert beam1.block_ids == beam0.block_ids[:1] and s.kv.pool.ref_count(beam0.block_ids[0]) == 2
    out = s.schedule()
    assert plan(out) == [("beam#beam0", 6, 1), ("beam#beam1", 4, 3), ("x", 3, 1)]   # y still waits
    s.mark_in_flight(out)   # asynchronous scheduling: only x samples ahead; the round picks the beams' tokens
    assert beam0.token_ids[-1] == 7 and beam1.token_ids[-1] == 8 and s.requests["x"].token_ids[-1] == PLACEHOLDER
    s.update(out, [9, 11, 31], [top((9, -0.1), (10, -0.15)), top((11, -0.9), (12, -1.0)), None])
    beam0, beam2 = s.groups["beam"].members   # beam0 won both places: beam1 is dropped, beam0 forks beam2
    assert (beam0.request_id, beam2.request_id) == ("beam#beam0", "beam#beam2")
    assert beam0.output_token_ids == [7, 9] and beam2.output_token_ids == [7, 10]
    assert beam1.finish_reason is FinishReason.LENGTH and not beam1.block_ids
    assert s.requests["x"].output_token_ids == [30, 31] and s.check_integrity() == []
    results = []
    while s.has_work:
        out = s.schedule()
        rows = [x for x in out.scheduled if x.samples]
        results += s.update(out, [13 if x.request.group else 32 for x in rows],
                            [top((13, -0.1), (14, -0.2)) if x.request.group else None for x in rows])
    beam, = [o for o in results if o.request_id == "beam"]
    assert (beam.new_token_ids, beam.finish_reason, beam.last) == ([7, 9, 13], FinishReason.LENGTH, True)
    assert beam.cumulative_logprob == pytest.approx(-0.3)
    assert {o.request_id for o in results if o.last} == {"beam", "x", "y"}
    assert not s.groups and not s.requests and s.kv.num_used_blocks == 0 and s.check_integrity() == []
