"""The scheduler with several batches in flight (pipeline parallelism): each batch leaves out the requests of the
batches still in flight and takes at most its share of rows; a request preempted while in flight gets its result
and rejoins only once that batch is applied."""
from __future__ import annotations

from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import RequestStatus, SamplingParams
from engine_svc.core.scheduler import Scheduler, SchedulerConfig

P = SamplingParams(max_tokens=100)


def make(num_blocks=16, budget=64, max_num_seqs=4):
    kv = KVCacheManager(num_blocks, 4, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=32),
                     kv, frozenset({99}))


def plan(out):
    return [(s.request.request_id, s.start, s.num_new_tokens) for s in out.scheduled]


def ids(*outs):
    return frozenset(s.request.request_id for o in outs for s in o.scheduled)


def apply(s, out, token=7):
    return s.update(out, [token] * sum(x.samples for x in out.scheduled))


def test_batches_in_flight_are_disjoint_and_split_the_rows():
    s = make()
    for r in "abcd":
        s.add_request(r, [1, 2, 3], P)
    first = s.schedule(max_rows=2)
    second = s.schedule(ids(first), max_rows=2)
    assert plan(first) == [("a", 0, 3), ("b", 0, 3)] and plan(second) == [("c", 0, 3), ("d", 0, 3)]
    assert s.schedule(ids(first, second), max_rows=2).is_empty          # everyone is in flight
    apply(s, first)
    third = s.schedule(ids(second), max_rows=2)
    assert plan(third) == [("a", 3, 1), ("b", 3, 1)]                    # a and b decode; c and d still in flight


def test_a_prompt_in_flight_gets_its_next_chunk_only_after_its_batch():
    s = make(budget=4)
    s.add_request("long", list(range(1, 11)), P)
    first = s.schedule()
    assert plan(first) == [("long", 0, 4)]
    assert s.schedule(ids(first)).is_empty
    apply(s, first)
    assert plan(s.schedule()) == [("long", 4, 4)]


def test_a_request_preempted_in_flight_keeps_its_result_and_rejoins_after_its_batch():
    s = make(num_blocks=3, max_num_seqs=2)
    s.add_request("a", [1, 2], SamplingParams(max_tokens=8))
    s.add_request("b", [3, 4, 5], SamplingParams(max_tokens=8))
    flight = [s.schedule(max_rows=1)]                                     # two batches in flight, one row each
    flight.append(s.schedule(ids(*flight), max_rows=1))
    for _ in range(4):                                                    # a decodes at 2, 3; b at 3, 4
        apply(s, flight.pop(0))
        flight.append(s.schedule(ids(*flight), max_rows=1))
    assert plan(flight[-1]) == [("b", 4, 1)] and s.kv.num_free_blocks == 0
    apply(s, flight.pop(0))
    grow = s.schedule(ids(*flight), max_rows=1)                           # a's position 4 needs a block
    b = s.requests["b"]
    assert plan(grow) == [("a", 4, 1)] and grow.preempted == [b]         # b goes, though its batch is in flight
    assert b.status is RequestStatus.WAITING and b.block_ids == []
    assert s.schedule(ids(*flight, grow)).is_empty                        # b does not rejoin while in flight
    out = apply(s, flight.pop(0), token=11)
    assert [(o.request_id, o.new_token_ids) for o in out] == [("b", [11])]
    assert b.token_ids == [3, 4, 5, 7, 7, 11] and b.num_computed_tokens == 0
    apply(s, grow)
    s.abort("a")
    assert plan(s.schedule()) == [("b", 0, 6)]                            # b recomputes, its tokens kept
