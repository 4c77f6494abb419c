"""How a replica's polled engine load and the gateway's own in-flight count combine (no processes)."""
from __future__ import annotations

from types import SimpleNamespace

from gateway.pipeline import Pipeline
from protos.tandem.internal.v1 import engine_pb2 as epb


def replica(in_flight: int, at_poll: int, running: int, waiting: int, used: int = 0, total: int = 0):
    return SimpleNamespace(name="r", live=True, num_in_flight=in_flight, in_flight_at_poll=at_poll,
                           load=epb.EngineLoad(num_running=running, num_waiting=waiting, kv_blocks_used=used,
                                               kv_blocks_total=total))


def test_this_gateways_requests_count_once():
    load = Pipeline._load_of(replica(in_flight=2, at_poll=2, running=2, waiting=0, used=10, total=40))
    assert (load.in_flight, load.others, load.kv_usage, load.score) == (2, 0, 0.25, 2.25)


def test_a_stale_poll_of_finished_work_adds_nothing():
    # The poll saw our 3 requests running; they have finished since: the replica is idle.
    assert Pipeline._load_of(replica(in_flight=0, at_poll=3, running=3, waiting=0)).score == 0


def test_other_gateways_requests_count():
    load = Pipeline._load_of(replica(in_flight=1, at_poll=1, running=4, waiting=2))
    assert (load.in_flight, load.others) == (1, 5)


def test_no_kv_total_yet_means_no_usage():
    assert Pipeline._load_of(replica(0, 0, 0, 0)).kv_usage == 0.0
