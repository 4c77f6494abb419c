"""The gateway's Prometheus metrics on a scripted clock and a fresh registry: every value worked out by hand."""
from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics, token_buckets
from gateway.metrics_export import MetricsPortError, serve_metrics_http
from protos.tandem.internal.v1 import engine_pb2 as epb

MODEL, REPLICA = "smol", "10.0.0.1:50053"
L = {"model_name": MODEL, "replica": REPLICA}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    clock = Clock()
    return GatewayMetrics(MODEL, max_model_len=2048, registry=CollectorRegistry(), clock=clock), clock


def value(m: GatewayMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value("tandem:" + name, {**L, **labels})


def test_token_buckets_are_1_2_5_up_to_the_context():
    assert token_buckets(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
    assert token_buckets(1) == (1,)
    assert token_buckets(20) == (1, 2, 5, 10, 20)


def test_one_request_timeline(setup):
    m, clock = setup
    r = m.request(REPLICA)                # t = 100.0
    clock.now = 100.5
    r.submitted(prompt_tokens=7)
    clock.now = 101.0
    r.chunk(0, 1)                         # first token: TTFT 1.0, queue 0.5
    clock.now = 101.5
    r.chunk(0, 2)                         # 0.5 over 2 tokens: two ITLs of 0.25
    clock.now = 101.625
    r.chunk(0, 0)                         # a chunk without tokens changes nothing
    clock.now = 101.75
    r.chunk(0, 1)                         # one ITL of 0.25
    clock.now = 109.0
    r.finished("length")                  # E2E runs to the last chunk with tokens: 1.75
    assert value(m, "time_to_first_token_seconds_sum") == pytest.approx(1.0)
    assert value(m, "time_to_first_token_seconds_count") == 1
    assert value(m, "request_queue_time_seconds_sum") == pytest.approx(0.5)
    for name in ("inter_token_latency_seconds", "time_per_output_token_seconds"):
        assert value(m, name + "_count") == 3
        assert value(m, name + "_sum") == pytest.approx(0.75)
        assert value(m, name + "_bucket", le="0.3") == 3 and value(m, name + "_bucket", le="0.2") == 0
    assert value(m, "e2e_request_latency_seconds_sum") == pytest.approx(1.75)
    assert value(m, "prompt_tokens_total") == 7 and value(m, "generation_tokens_total") == 4
    assert value(m, "request_prompt_tokens_sum") == 7 and value(m, "request_generation_tokens_sum") == 4
    assert value(m, "request_prompt_tokens_bucket", le="5.0") == 0
    assert value(m, "request_prompt_tokens_bucket", le="10.0") == 1
    assert value(m, "request_success_total", finished_reason="length") == 1
    r.finished("stop")
    r.chunk(0, 5)                         # after the end: ignored
    assert value(m, "request_success_total", finished_reason="stop") is None
    assert value(m, "generation_tokens_total") == 4


def test_several_outputs_each_keep_their_own_gaps(setup):
    m, clock = setup
    r = m.request(REPLICA)
    r.submitted(3)
    clock.now = 101.0
    r.chunk(0, 3)      # first chunk of output 0 carries 3 tokens: two ITLs of 0
    clock.now = 102.0
    r.chunk(1, 1)      # output 1's first token: no ITL, and no second TTFT
    clock.now = 104.0
    r.chunk(0, 1)      # output 0: 3.0 since its last chunk
    r.chunk(1, 2)      # output 1: 2.0 over 2 tokens
    r.finished("stop")
    assert value(m, "time_to_first_token_seconds_count") == 1
    assert value(m, "inter_token_latency_seconds_count") == (4 - 1) + (3 - 1)
    assert value(m, "inter_token_latency_seconds_sum") == pytest.approx(0 + 0 + 3.0 + 1.0 + 1.0)
    assert value(m, "request_generation_tokens_sum") == 7 and value(m, "prompt_tokens_total") == 3
    assert value(m, "e2e_request_latency_seconds_sum") == pytest.approx(4.0)


def test_an_aborted_request_counts_as_abort_only(setup):
    m, clock = setup
    r = m.request(REPLICA)
    r.submitted(5)
    clock.now = 101.0
    r.chunk(0, 1)
    r.aborted()
    r.finished("length")
    assert value(m, "request_success_total", finished_reason="abort") == 1
    assert value(m, "request_success_total", finished_reason="length") is None
    assert value(m, "e2e_request_latency_seconds_count") is None
    assert value(m, "prompt_tokens_total") == 5 and value(m, "generation_tokens_total") == 1


def test_a_request_that_never_got_a_token_counts_no_prompt_tokens(setup):
    m, _ = setup
    r = m.request(REPLICA)
    r.submitted(9)
    r.aborted()
    assert value(m, "prompt_tokens_total") is None and value(m, "time_to_first_token_seconds_count") is None


def test_engine_load_sets_gauges_and_turns_totals_into_increments(setup):
    m, _ = setup
    load = epb.EngineLoad(num_running=3, num_waiting=2, kv_blocks_total=200, kv_blocks_used=50,
                          prefix_cache_queries=100, prefix_cache_hits=40, num_preemptions=1)
    m.observe_engine_load(REPLICA, load)
    assert (value(m, "num_requests_running"), value(m, "num_requests_waiting")) == (3, 2)
    assert value(m, "kv_cache_usage_perc") == pytest.approx(0.25)
    load.prefix_cache_queries, load.prefix_cache_hits, load.num_preemptions = 130, 50, 1
    m.observe_engine_load(REPLICA, load)
    assert (value(m, "prefix_cache_queries_total"), value(m, "prefix_cache_hits_total"),
            value(m, "num_preemptions_total")) == (130, 50, 1)
    # The engine restarted: its totals start again from 0, and the counters never go down.
    m.observe_engine_load(REPLICA, epb.EngineLoad(kv_blocks_total=200, prefix_cache_queries=8, prefix_cache_hits=2))
    assert (value(m, "prefix_cache_queries_total"), value(m, "prefix_cache_hits_total")) == (138, 52)
    assert value(m, "kv_cache_usage_perc") == 0
    other = {"model_name": MODEL, "replica": "other:1"}
    m.observe_engine_load("other:1", epb.EngineLoad(num_running=9))
    assert m.registry.get_sample_value("tandem:num_requests_running", other) == 9
    assert value(m, "num_requests_running") == 0


def test_speculative_decoding_totals_become_vllm_named_counters(setup):
    m, _ = setup
    load = epb.EngineLoad(spec_decode_num_drafts=10, spec_decode_num_draft_tokens=40,
                          spec_decode_num_accepted_tokens=25, spec_decode_num_accepted_tokens_per_pos=[9, 8, 5, 3],
                          spec_decode_draft_seconds=0.5, spec_decode_step_seconds=2.0,
                          spec_decode_num_proposal_errors=1)
    m.observe_engine_load(REPLICA, load)
    load.spec_decode_num_drafts, load.spec_decode_num_accepted_tokens_per_pos[0] = 12, 11
    m.observe_engine_load(REPLICA, load)
    assert (value(m, "spec_decode_num_drafts_total"), value(m, "spec_decode_num_draft_tokens_total"),
            value(m, "spec_decode_num_accepted_tokens_total")) == (12, 40, 25)
    assert value(m, "spec_decode_draft_seconds_total") == pytest.approx(0.5)
    assert value(m, "spec_decode_num_proposal_errors_total") == 1
    assert value(m, "spec_decode_num_accepted_tokens_per_pos_total", position="0") == 11
    assert value(m, "spec_decode_num_accepted_tokens_per_pos_total", position="3") == 3


def test_engine_load_reports_the_host_kv_tier(setup):
    m, _ = setup
    load = epb.EngineLoad(kv_blocks_total=8, host_kv_blocks_total=64, host_kv_blocks_used=12, host_kv_hits=5,
                          host_kv_bytes_offloaded=4096, host_kv_bytes_loaded=1024)
    m.observe_engine_load(REPLICA, load)
    load.host_kv_hits, load.host_kv_bytes_loaded = 7, 2048
    m.observe_engine_load(REPLICA, load)
    assert (value(m, "host_kv_cache_blocks"), value(m, "host_kv_cache_hits_total")) == (12, 7)
    assert value(m, "host_kv_cache_bytes_total", direction="load") == 2048
    assert value(m, "host_kv_cache_bytes_total", direction="offload") == 4096


def test_the_pipeline_poller_feeds_every_answer_and_survives_a_failed_call(setup):
    """The metrics read the routing's load polls: each answered GetLoad is observed, a failed one is not (the
    gauges keep their last values) and polling goes on."""
    import grpc

    from gateway.config import GatewayConfig
    from gateway.pipeline import Pipeline

    m, _ = setup
    answers = [epb.EngineLoad(num_waiting=4), grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None),
               epb.EngineLoad(num_waiting=6)]
    seen = []

    class Engine:
        async def GetLoad(self, request, timeout=None):
            a = answers.pop(0)
            if isinstance(a, Exception):
                raise a
            return a

        async def GetInfo(self, request, timeout=None):   # read as the replica comes up
            return epb.EngineInfo()

    async def run():
        pipeline = Pipeline(GatewayConfig(engine=REPLICA))
        pipeline.load_observer = lambda name, load: (seen.append(load.num_waiting), m.observe_engine_load(name, load))
        (replica,) = pipeline.replicas
        replica.engine = Engine()
        for _ in range(3):
            await pipeline._poll_replica(replica)
            if len(seen) == 1:
                assert value(m, "num_requests_waiting") == 4
        await pipeline.close()

    asyncio.run(run())
    assert seen == [4, 6] and value(m, "num_requests_waiting") == 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_over_http_parse_back(setup):
    m, clock = setup
    r = m.request(REPLICA)
    r.submitted(4)
    clock.now = 100.25
    r.chunk(0, 1)
    r.finished("stop")
    port = _free_port()
    server = serve_metrics_http(m, "127.0.0.1", port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        with pytest.raises(MetricsPortError, match=f"metrics port 127.0.0.1:{port}"):
            serve_metrics_http(m, "127.0.0.1", port)
    finally:
        server.shutdown()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    key = tuple(sorted(L.items()))
    assert samples[("tandem:time_to_first_token_seconds_sum", key)] == pytest.approx(0.25)
    assert samples[("tandem:request_success_total", tuple(sorted({**L, "finished_reason": "stop"}.items())))] == 1
    assert samples[("tandem:prompt_tokens_total", key)] == 4
