"""The gateway's /metrics read back after a known workload on the shared stack: counts and token totals equal what
the responses' Usage says, the histograms' totals agree, the engine's gauges are there; then `tandem bench serve`'s
JSON agrees with the server's counters. The stack is shared, so every check is on the change over the workload."""
from __future__ import annotations

import json
import math
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import serve_load
from protos.tandem.v1 import generation_pb2 as api

ENGINE_GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
ENGINE_COUNTERS = ("prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total")


class Scrape:
    def __init__(self, url: str) -> None:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def get(self, name: str, **labels) -> float:
        """The sum over every series of `name` whose labels include `labels`."""
        return sum(s.value for s in self.samples
                   if s.name == "tandem:" + name and labels.items() <= s.labels.items())

    def labels_of(self, name: str) -> list[dict]:
        return [s.labels for s in self.samples if s.name == "tandem:" + name]

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """(le, cumulative count) of the histogram `name`, summed over its series."""
        edges = sorted({float(s.labels["le"]) for s in self.samples if s.name == f"tandem:{name}_bucket"})
        return [(le, sum(s.value for s in self.samples if s.name == f"tandem:{name}_bucket"
                         and float(s.labels["le"]) == le)) for le in edges]


def delta(before: Scrape, after: Scrape, name: str, **labels) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def scrape_with_engine_load(url: str) -> Scrape:
    """The engine-side metrics appear after the gateway's first GetLoad poll (right after start-up)."""
    deadline = time.monotonic() + 30
    while True:
        s = Scrape(url)
        if all(s.labels_of(g) for g in ENGINE_GAUGES) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


def test_counts_and_totals_after_a_known_workload(stack, api_stub):
    model_name = api_stub.GetModelInfo(api.GetModelInfoRequest(), timeout=30).model_name
    before = scrape_with_engine_load(stack.metrics_url)
    t0 = time.monotonic()
    usages, outputs = [], []   # outputs: tokens of each output
    for max_tokens in (4, 6):
        resp = api_stub.Generate(api.GenerateRequest(
            prompt=f"Count to {max_tokens}:", params=api.GenerationParams(max_tokens=max_tokens, temperature=0,
                                                                          ignore_eos=True)), timeout=120)
        usages.append(resp.usage)
        outputs.append(len(resp.token_ids))
    per_index: dict[int, int] = {}
    for chunk in api_stub.GenerateStream(api.GenerateRequest(
            prompt="Two colours:", params=api.GenerationParams(max_tokens=3, n=2, temperature=0.8, seed=3,
                                                               ignore_eos=True)), timeout=120):
        per_index[chunk.index] = per_index.get(chunk.index, 0) + len(chunk.token_ids)
        if chunk.HasField("usage"):
            usages.append(chunk.usage)
    outputs += per_index.values()
    wall = time.monotonic() - t0
    after = scrape_with_engine_load(stack.metrics_url)

    assert outputs == [4, 6, 3, 3]
    prompt, completion = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
    assert completion == sum(outputs) == 16
    assert delta(before, after, "request_success_total", finished_reason="length") == 3
    assert delta(before, after, "request_success_total") == 3
    assert delta(before, after, "prompt_tokens_total") == prompt
    assert delta(before, after, "generation_tokens_total") == completion
    assert delta(before, after, "request_prompt_tokens_sum") == prompt
    assert delta(before, after, "request_generation_tokens_sum") == completion
    for name in ("request_prompt_tokens", "request_generation_tokens", "time_to_first_token_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(before, after, name + "_count") == 3, name
        assert delta(before, after, name + "_bucket", le="+Inf") == 3, name
    # One inter-token gap per token after each output's first.
    for name in ("inter_token_latency_seconds", "time_per_output_token_seconds"):
        assert delta(before, after, name + "_count") == sum(n - 1 for n in outputs), name
    ttft, e2e = (delta(before, after, f"{n}_sum") for n in ("time_to_first_token_seconds",
                                                             "e2e_request_latency_seconds"))
    queue = delta(before, after, "request_queue_time_seconds_sum")
    itl = delta(before, after, "inter_token_latency_seconds_sum")
    # Per request: queue <= TTFT <= E2E, and the ITLs of an output fit between its first and last token; the
    # requests ran one after another inside `wall` seconds.
    assert 0 < queue <= ttft <= e2e <= wall
    assert 0 < itl <= 2 * (e2e - ttft) + 1e-9   # two outputs of one request share its span
    # Every series is labelled with the model and the engine that served it.
    for labels in after.labels_of("e2e_request_latency_seconds_count"):
        assert (labels["model_name"], labels["replica"]) == (model_name, stack.engine_address)
    for name in ENGINE_GAUGES + ENGINE_COUNTERS:
        series = after.labels_of(name)
        assert [(s["model_name"], s["replica"]) for s in series] == [(model_name, stack.engine_address)], name
    assert 0 <= after.get("kv_cache_usage_perc") <= 1
    assert after.get("prefix_cache_hits_total") <= after.get("prefix_cache_queries_total")
    assert delta(before, after, "prefix_cache_queries_total") >= 0


def test_bench_serve_json_agrees_with_the_server_counters(stack, tmp_path):
    asked = [3, 5, 2, 4, 3]
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps({"prompt": f"Say something about {i} cats.", "max_tokens": n})
                                 for i, n in enumerate(asked)) + "\n")
    out = tmp_path / "serve.json"
    before = Scrape(stack.metrics_url)
    serve_load.main(["--address", stack.address, "--dataset", str(dataset), "--concurrency", "2",
                     "--no-progress", "--out-dir", str(tmp_path / "png"), "--json", str(out)])
    after = Scrape(stack.metrics_url)
    result = json.loads(out.read_text())
    s, warmup = result["summary"], result["warmup"]
    assert (s["requests"], s["completed"], s["errors"]) == (5, 5, 0)
    assert warmup["output_tokens"] == 2 and not warmup["error"]
    # The server also saw the bench's warm-up request, which the JSON records apart.
    assert delta(before, after, "request_success_total") == s["completed"] + 1
    assert delta(before, after, "prompt_tokens_total") == s["prompt_tokens"] + warmup["prompt_tokens"]
    assert delta(before, after, "generation_tokens_total") == s["output_tokens"] + warmup["output_tokens"] \
        == sum(asked) + 2
    assert delta(before, after, "inter_token_latency_seconds_count") == s["itl_s"]["count"] + 1
    assert delta(before, after, "time_to_first_token_seconds_count") == s["ttft_s"]["count"] + 1

    # Each request's server TTFT (arrival at the gateway -> first token sent) is at most the client's. So at the
    # first bucket edge at or above the bench's p50, the server has counted at least the bench's faster half; and
    # the server's TTFTs are not off by a unit: fewer than half of them lie below half the bench's p50.
    p50 = s["ttft_s"]["p50"]
    before_b, after_b = dict(before.buckets("time_to_first_token_seconds")), after.buckets(
        "time_to_first_token_seconds")
    counts = [(le, c - before_b.get(le, 0)) for le, c in after_b]
    at_or_above = next(c for le, c in counts if le >= p50)
    assert at_or_above >= math.ceil(len(asked) / 2)
    below_half = max((c for le, c in counts if le <= p50 / 2), default=0)
    assert below_half < (len(asked) + 1) / 2
