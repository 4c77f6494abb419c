"""Penalty counts kept on the device (engine_svc/sampling/penalty_state.py) against the counts made from each row's
id history on the host: step after step the penalized logits are exactly equal, while requests join and end, slots
are reused and the pool grows, and rows whose tokens came another way (a beam's, a verify row's run) are refilled.
The state tells the engine to wait for real ids exactly when a slot is behind an id still in flight."""
from __future__ import annotations

import pytest
import torch

from engine_svc.core.beam_search import BeamSearch
from engine_svc.core.request import PLACEHOLDER, Request, RequestStatus, SamplingParams
from engine_svc.sampling.logits_processors import apply_penalties, apply_penalty_counts
from engine_svc.sampling.penalty_state import MIN_SLOTS, PenaltyState, pool_peak_bytes
from engine_svc.sampling.sampler import padded, penalty_values

V = 40
CPU = torch.device("cpu")
PARAMS = [SamplingParams(repetition_penalty=1.4), SamplingParams(presence_penalty=0.7, frequency_penalty=0.3),
          SamplingParams(temperature=0.0), SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5)]


def request(i: int, params: SamplingParams, group=None) -> Request:
    prompt = [(7 * i + 3 * j) % V for j in range(3 + i % 5)]
    return Request(f"r{i}", prompt, params, arrival=i, group=group)


def host_reference(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The path before: every row's counts from its prompt and output ids, rebuilt each step."""
    return apply_penalties(logits, padded([r.prompt_token_ids for r in requests], CPU),
                           padded([r.output_token_ids for r in requests], CPU),
                           *penalty_values([r.params for r in requests], CPU))


def step(state: PenaltyState, requests: list[Request], g: torch.Generator) -> torch.Tensor:
    """One sampling step as the runner takes it: penalize, take the argmax, count it, and append it as the
    scheduler does. Returns the penalized logits after checking them against the host reference."""
    logits = torch.randn(len(requests), V, generator=g) * 2
    penalties = state.penalties(requests)
    ours = logits if penalties is None else apply_penalty_counts(logits, penalties)
    assert torch.equal(ours, host_reference(logits, requests))
    sampled = ours.argmax(dim=-1)
    state.count(sampled)
    for r, t in zip(requests, sampled.tolist()):
        r.token_ids.append(t)
    # Counted on the device: the next step reads these rows as they are, with no refill from the host.
    assert all(state.is_current(r) for r in requests if r.params.uses_penalties and r.group is None)
    return ours


def test_device_counts_equal_the_host_histories_step_after_step():
    g = torch.Generator().manual_seed(0)
    state = PenaltyState(V, CPU, capacity=64)
    live = [request(i, PARAMS[i % 4]) for i in range(6)]
    for _ in range(5):
        step(state, live, g)
    assert state.num_slots == 5                        # the plain greedy row holds none
    ended = live.pop(1)
    ended.status = RequestStatus.FINISHED
    live += [request(i, PARAMS[i % 4]) for i in range(6, 6 + 2 * MIN_SLOTS)]   # more than the pool: it grows
    for _ in range(6):
        step(state, live, g)
    # 4 left + 12 new penalized rows: the pool doubled once, and the ended request's slot was taken again.
    assert sum(r.params.uses_penalties for r in live) == state.num_slots == state.counts.shape[0] == 2 * MIN_SLOTS


def test_an_ended_requests_slot_is_refilled_for_the_next_owner_of_its_id():
    g = torch.Generator().manual_seed(1)
    state = PenaltyState(V, CPU, capacity=64)
    first = request(0, PARAMS[0])
    for _ in range(4):
        step(state, [first], g)
    first.status = RequestStatus.FINISHED
    again = Request("r0", [5, 6], PARAMS[1], arrival=9)   # the same id, a new request
    step(state, [again], g)
    assert state.num_slots == 1 and state.is_current(again)


def test_tokens_that_bypass_the_count_make_the_slot_refill_from_the_host():
    g = torch.Generator().manual_seed(2)
    state = PenaltyState(V, CPU, capacity=64)
    beam_params = SamplingParams(temperature=0.0, use_beam_search=True, best_of=2, repetition_penalty=1.5)
    group = BeamSearch("b", beam_params, frozenset())
    beam = request(1, group.member_params, group=group)
    plain = request(2, PARAMS[1])
    step(state, [beam, plain], g)
    assert not state.is_current(beam)   # a beam's token is its group's choice: never counted here
    plain.token_ids += [3, 3, 9]        # a verify row's run: appended without count()
    assert not state.is_current(plain)
    for _ in range(3):
        step(state, [beam, plain], g)   # each step refills what fell behind; the reference check passes
    assert state.is_current(plain)


def test_the_engine_waits_only_for_a_slot_behind_an_id_in_flight():
    g = torch.Generator().manual_seed(3)
    state = PenaltyState(V, CPU, capacity=64)
    r = request(0, PARAMS[0])
    assert not state.needs_real_ids(r)           # nothing in flight: a first fill reads real ids
    step(state, [r], g)
    r.token_ids[-1] = PLACEHOLDER                # launched: its id not known yet, but counted on the device
    assert state.is_current(r) and not state.needs_real_ids(r)
    r.token_ids[-1] = 4
    r.token_ids += [5, PLACEHOLDER]              # a token that bypassed the count, then one in flight
    assert state.needs_real_ids(r)
    with pytest.raises(RuntimeError, match="in flight"):
        state.penalties([r])


def test_a_full_pool_takes_back_a_waiting_requests_slot_and_its_owner_refills():
    g = torch.Generator().manual_seed(4)
    state = PenaltyState(V, CPU, capacity=3)
    first = [request(i, PARAMS[0]) for i in range(3)]
    step(state, first, g)
    assert state.counts.shape[0] == 3                 # capped at the capacity, not MIN_SLOTS
    waiting, batch = first[0], first[1:] + [request(3, PARAMS[1])]   # first[0] preempted, a newcomer runs
    step(state, batch, g)
    assert state.num_slots == 3 and not state.is_current(waiting)
    waiting.token_ids.append(11)                      # what it output before it waited is still on the host
    step(state, [waiting, *batch[:2]], g)             # it refills from the host; the reference check passes
    assert state.is_current(waiting) and state.counts.shape[0] == 3


def test_the_pool_grows_by_doubling_to_its_capacity_and_its_peak_is_the_last_growth():
    assert pool_peak_bytes(100, V) == (64 + 100) * V * 5    # 8, 16, 32, 64, then 100 beside the 64
    assert pool_peak_bytes(5, V) == 5 * V * 5
    state = PenaltyState(V, CPU, capacity=20)
    g = torch.Generator().manual_seed(5)
    live = [request(i, PARAMS[0]) for i in range(20)]
    step(state, live[:9], g)
    assert state.counts.shape[0] == 16
    step(state, live, g)
    assert state.counts.shape[0] == 20
    with pytest.raises(ValueError, match="at least one slot"):
        PenaltyState(V, CPU, capacity=0)
