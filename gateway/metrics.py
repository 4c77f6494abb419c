"""Prometheus metrics of the gateway, with vLLM's names under a `tandem:` prefix (same suffixes and units, so
vLLM dashboards port by renaming `vllm:` to `tandem:`). Every metric carries `model_name` and `replica` (the
engine address that served the request; the router passes it per request).

What is measured, all on the gateway's monotonic clock:
- time_to_first_token_seconds: the request reaching the gateway -> the first chunk with tokens sent to the client
  (so it includes tokenization, queueing, prefill and detokenization).
- inter_token_latency_seconds (and its older alias time_per_output_token_seconds, same values): for each output,
  the gap between consecutive chunks, spread evenly over the k tokens of the later chunk (k observations of
  gap/k); the extra tokens of an output's first chunk count 0. An output of T tokens gives T - 1 observations,
  summing to its last chunk's time minus its first's: the same convention as `tandem bench serve`.
- e2e_request_latency_seconds: the request reaching the gateway -> its last chunk (finished requests only).
- request_queue_time_seconds: the engine reports no per-request timings, so this is the gateway's time from the
  submit to the engine -> the first chunk with tokens: the engine queue plus the prefill step (an upper bound).
- prompt/generation tokens: the counters grow as tokens stream (prompt tokens at the first token); the histograms
  take one observation per finished request, equal to its Usage.
- request_success_total{finished_reason}: stop, length or cancelled for requests that ended normally; abort for
  those the client cancelled or whose deadline passed.
- running/waiting, kv_cache_usage_perc (a fraction in [0, 1], as vLLM's), prefix cache queries/hits (tokens) and
  preemptions: from the engine's GetLoad, polled; the engine's totals become counter increments. So do the host
  KV tier's (--kv-offload-gb) blocks in use (a gauge), hits (blocks copied back instead of recomputed) and bytes
  moved each way.
- speculative decoding, from GetLoad the same way, under vLLM's names: spec_decode_num_drafts (verify rows),
  spec_decode_num_draft_tokens (proposed), spec_decode_num_accepted_tokens, and
  spec_decode_num_accepted_tokens_per_pos{position}; acceptance rate = accepted / draft tokens, mean accepted
  length = 1 + accepted / drafts. spec_decode_draft_seconds and spec_decode_step_seconds (Tandem's own) give the
  draft time share; spec_decode_num_proposal_errors counts rows whose proposer failed.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "tandem:"
LABELS = ("model_name", "replica")

# Seconds: fine below a second (GPU TTFT/ITL), coarse up to minutes (a loaded CPU).
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
REQUEST_LATENCY_BUCKETS = LATENCY_BUCKETS + (600.0, 1200.0, 2400.0)


def token_buckets(max_tokens: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the first value >= max_tokens."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            out.append(float(m * scale))
            if m * scale >= max_tokens:
                return tuple(out)
        scale *= 10


class GatewayMetrics:
    """All metrics of one gateway in their own registry; `request()` gives the per-request recorder."""

    def __init__(self, model_name: str, max_model_len: int, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        r = self.registry

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, LABELS, buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Request arrival to its first token, seconds.",
                         LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens, seconds.",
                        LATENCY_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds",
                         "Time between consecutive output tokens, seconds (older name of the ITL).", LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Request arrival to its last token, seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds",
                          "Submit to the engine -> first token: engine queue plus prefill, seconds.",
                          REQUEST_LATENCY_BUCKETS)
        tokens = token_buckets(max(1, max_model_len))
        self.prompt_hist = hist("request_prompt_tokens", "Prompt tokens per finished request.", tokens)
        self.generation_hist = hist("request_generation_tokens", "Generated tokens per finished request "
                                                                 "(all outputs).", tokens)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of requests that started "
                                                               "generating.", LABELS, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", LABELS, registry=r)
        self.success = Counter(PREFIX + "request_success", "Requests that ended, by finish reason.",
                               LABELS + ("finished_reason",), registry=r)
        self.running = Gauge(PREFIX + "num_requests_running", "Requests the engine is running.", LABELS,
                             registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting in the engine.", LABELS,
                             registry=r)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                              LABELS, registry=r)
        self.prefix_queries = Counter(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                                                      "cache.", LABELS, registry=r)
        self.prefix_hits = Counter(PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   LABELS, registry=r)
        self.preemptions = Counter(PREFIX + "num_preemptions", "Requests preempted by the engine.", LABELS,
                                   registry=r)
        self.spec_counters = {
            name: Counter(PREFIX + name, doc, LABELS, registry=r) for name, doc in (
                ("spec_decode_num_drafts", "Verify rows: a request's proposals checked in one step."),
                ("spec_decode_num_draft_tokens", "Tokens proposed by speculative decoding."),
                ("spec_decode_num_accepted_tokens", "Proposed tokens the model accepted."),
                ("spec_decode_draft_seconds", "Engine time spent proposing tokens."),
                ("spec_decode_step_seconds", "Engine step time while speculative decoding is on."),
                ("spec_decode_num_proposal_errors", "Rows whose proposer failed; each decoded without proposals."))}
        self.spec_per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                    "Accepted proposed tokens, by position in the proposal.",
                                    LABELS + ("position",), registry=r)
        self.host_kv_used = Gauge(PREFIX + "host_kv_cache_blocks", "Host KV tier blocks holding evicted K/V.",
                                  LABELS, registry=r)
        self.host_kv_hits = Counter(PREFIX + "host_kv_cache_hits", "KV blocks a prefix hit copied back from the "
                                                                   "host tier instead of recomputing them.",
                                    LABELS, registry=r)
        self.host_kv_bytes = Counter(PREFIX + "host_kv_cache_bytes", "Bytes moved between the device KV cache "
                                                                     "and its host tier.",
                                     LABELS + ("direction",), registry=r)
        # The engine reports totals since it started; the last seen ones turn them into increments.
        self._engine_totals: dict[str, tuple[int, ...]] = {}

    def request(self, replica: str) -> "RequestMetrics":
        """Called when a request reaches the gateway; its clock starts now."""
        return RequestMetrics(self, replica)

    def observe_engine_load(self, replica: str, load) -> None:
        """One GetLoad answer (an EngineLoad) of the engine at `replica`."""
        labels = (self.model_name, replica)
        self.running.labels(*labels).set(load.num_running)
        self.waiting.labels(*labels).set(load.num_waiting)
        self.kv_usage.labels(*labels).set(load.kv_blocks_used / load.kv_blocks_total if load.kv_blocks_total else 0)
        self.host_kv_used.labels(*labels).set(load.host_kv_blocks_used)
        per_pos = list(load.spec_decode_num_accepted_tokens_per_pos)
        counters = [self.prefix_queries, self.prefix_hits, self.preemptions, *self.spec_counters.values(),
                    self.host_kv_hits]
        children = [c.labels(*labels) for c in counters]
        children += [self.host_kv_bytes.labels(*labels, "offload"), self.host_kv_bytes.labels(*labels, "load")]
        children += [self.spec_per_pos.labels(*labels, str(i)) for i in range(len(per_pos))]
        totals = (load.prefix_cache_queries, load.prefix_cache_hits, load.num_preemptions,
                  *(getattr(load, name) for name in self.spec_counters), load.host_kv_hits,
                  load.host_kv_bytes_offloaded, load.host_kv_bytes_loaded, *per_pos)
        last = self._engine_totals.get(replica, ())
        last = last + (0,) * (len(totals) - len(last))
        for child, new, old in zip(children, totals, last):
            # A total that went down means the engine restarted and counts from 0 again.
            if new != old:
                child.inc(new - old if new >= old else new)
        self._engine_totals[replica] = totals


class RequestMetrics:
    """One request's recorder. The servicer calls submitted() once the engine has it, chunk() for every chunk it
    sends, then finished() or aborted(); any call after the request ended is ignored."""

    def __init__(self, metrics: GatewayMetrics, replica: str) -> None:
        self._m = metrics
        self._labels = (metrics.model_name, replica)
        self._start = metrics.clock()
        self._submitted: float | None = None
        self._first_token: float | None = None
        self._last_chunk: dict[int, float] = {}   # output index -> time of its last chunk with tokens
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._ended = False

    def routed(self, replica: str) -> None:
        """The engine replica the router picked; every later observation is labelled with it."""
        self._labels = (self._m.model_name, replica)

    def submitted(self, prompt_tokens: int) -> None:
        self._submitted = self._m.clock()
        self.prompt_tokens = prompt_tokens

    def chunk(self, index: int, num_tokens: int) -> None:
        if self._ended or num_tokens == 0:
            return
        m, now = self._m, self._m.clock()
        if self._first_token is None:
            self._first_token = now
            m.ttft.labels(*self._labels).observe(now - self._start)
            if self._submitted is not None:
                m.queue.labels(*self._labels).observe(now - self._submitted)
            m.prompt_tokens.labels(*self._labels).inc(self.prompt_tokens)
        previous = self._last_chunk.get(index)
        gap = 0.0 if previous is None else (now - previous) / num_tokens
        for _ in range(num_tokens - 1 if previous is None else num_tokens):
            m.itl.labels(*self._labels).observe(gap)
            m.tpot.labels(*self._labels).observe(gap)
        self._last_chunk[index] = now
        self.generation_tokens += num_tokens
        m.generation_tokens.labels(*self._labels).inc(num_tokens)

    def finished(self, finished_reason: str) -> None:
        """The last output has ended with `finished_reason` (stop, length, cancelled)."""
        if self._ended:
            return
        self._ended = True
        m = self._m
        last = max(self._last_chunk.values(), default=m.clock())
        m.e2e.labels(*self._labels).observe(last - self._start)
        m.prompt_hist.labels(*self._labels).observe(self.prompt_tokens)
        m.generation_hist.labels(*self._labels).observe(self.generation_tokens)
        m.success.labels(*self._labels, finished_reason).inc()

    def aborted(self) -> None:
        """The client cancelled or its deadline passed before the request ended."""
        if self._ended:
            return
        self._ended = True
        self._m.success.labels(*self._labels, "abort").inc()
