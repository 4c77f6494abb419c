"""Two engine replicas behind one gateway (SmolLM2 on the CPU): load spreads, a shared prefix sticks to one
replica and is served from its cache, losing a replica fails only its own streams, and a restarted one is used
again. One stack for the module; the tests run in file order (the last two kill and restart engine B)."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc
from tests.e2e.conftest import free_port
from tests.e2e.test_backend_loss import start, wait_serving

SHARED_PREFIX = ("You are a meticulous assistant for a public library. You answer questions about opening hours, "
                 "membership, borrowing limits, late fees, study rooms, printing, and the children's reading "
                 "programme. Keep answers short, polite and factual, and never invent a policy. ")


class TwoReplicaStack:
    def __init__(self, model: str, log) -> None:
        self.model, self.log = model, log
        tok_port, gw_port = free_port(), free_port()
        self.engine_ports = [free_port(), free_port()]
        self.procs: dict[str, object] = {"tokenizer": start(["tokenizer_svc", "--model", model,
                                                             "--port", str(tok_port)], log)}
        for i in range(2):
            self.start_engine(i, wait=False)
        wait_serving(f"127.0.0.1:{tok_port}", self.procs["tokenizer"])
        for i in range(2):
            wait_serving(self.engine_address(i), self.procs[f"engine{i}"], timeout=300)
        self.procs["gateway"] = start(["gateway", "--host", "127.0.0.1", "--port", str(gw_port), "--tokenizer",
                                       f"127.0.0.1:{tok_port}", "--engine", self.engine_address(0),
                                       "--engine", self.engine_address(1)], log)
        self.address = f"127.0.0.1:{gw_port}"
        wait_serving(self.address, self.procs["gateway"])
        self.channels = [grpc.insecure_channel(self.address)] + [grpc.insecure_channel(self.engine_address(i))
                                                                for i in range(2)]
        self.api = generation_pb2_grpc.GenerationStub(self.channels[0])
        self.engines = [engine_pb2_grpc.EngineStub(c) for c in self.channels[1:]]

    def engine_address(self, i: int) -> str:
        return f"127.0.0.1:{self.engine_ports[i]}"

    def start_engine(self, i: int, wait: bool = True) -> None:
        self.procs[f"engine{i}"] = start(["engine_svc", "--model", self.model, "--port", str(self.engine_ports[i]),
                                          "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "256",
                                          "--max-num-seqs", "8"], self.log)
        if wait:
            wait_serving(self.engine_address(i), self.procs[f"engine{i}"], timeout=300)

    def kill_engine(self, i: int) -> None:
        proc = self.procs[f"engine{i}"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def load(self, i: int) -> epb.EngineLoad:
        return self.engines[i].GetLoad(epb.EngineLoadRequest(), timeout=10)

    def close(self) -> None:
        for c in self.channels:
            c.close()
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def two(smollm2_gguf, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("replicas") / "services.log", "w")
    stack = TwoReplicaStack(str(smollm2_gguf), log)
    yield stack
    stack.close()
    log.close()


def request(prompt: str, max_tokens: int, **params) -> api.GenerateRequest:
    return api.GenerateRequest(prompt=prompt, params=api.GenerationParams(max_tokens=max_tokens, temperature=0,
                                                                          **params))


def generate_concurrently(two: TwoReplicaStack, prompts: list[str], max_tokens: int) -> list:
    results: list = [None] * len(prompts)

    def run(i: int) -> None:
        try:
            results[i] = two.api.Generate(request(prompts[i], max_tokens, ignore_eos=True), timeout=120)
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


UNRELATED = ["The capital of France is", "Write a haiku about rain:", "def fibonacci(n):",
             "Three facts about octopuses:"]


def test_concurrent_unrelated_requests_spread_over_both_replicas(two):
    before = [two.load(i).prefix_cache_queries for i in range(2)]
    results = generate_concurrently(two, UNRELATED, max_tokens=24)
    assert all(isinstance(r, api.GenerateResponse) and len(r.token_ids) == 24 for r in results), results
    queried = [two.load(i).prefix_cache_queries - before[i] for i in range(2)]
    # Every prompt is looked up in its replica's prefix cache once: both replicas got some, none got all.
    prompt_tokens = sum(r.usage.prompt_tokens for r in results)
    assert sum(queried) == prompt_tokens and all(q > 0 for q in queried), (queried, prompt_tokens)


def test_shared_prefix_sticks_to_one_replica_and_hits_its_cache(two):
    before = [two.load(i).prefix_cache_queries for i in range(2)]
    responses = [two.api.Generate(request(SHARED_PREFIX + f"Question {k}: when do you open on day {k}?", 4),
                                  timeout=120) for k in range(4)]
    queried = [two.load(i).prefix_cache_queries - before[i] for i in range(2)]
    assert sorted(q > 0 for q in queried) == [False, True], queried      # one replica served all four
    assert responses[0].usage.cached_prompt_tokens == 0
    for r in responses[1:]:
        # The shared prefix is at least three full blocks of 16 tokens; each later request finds them cached.
        assert r.usage.cached_prompt_tokens >= 48, r.usage


def test_losing_a_replica_fails_only_its_streams_and_new_requests_succeed(two):
    params = api.GenerationParams(max_tokens=160, temperature=0, ignore_eos=True)
    streams = [two.api.GenerateStream(api.GenerateRequest(prompt=p, params=params), timeout=300)
               for p in UNRELATED[:2]]
    first = [len(next(s).token_ids) for s in streams]
    running = [two.load(i).num_running for i in range(2)]
    assert running == [1, 1], running                     # one long stream on each replica
    two.kill_engine(1)
    outcomes = []
    for s, n in zip(streams, first):
        try:
            outcomes.append(n + sum(len(c.token_ids) for c in s))
        except grpc.RpcError as e:
            outcomes.append(e.code())
    assert sorted(outcomes, key=str) == sorted([160, grpc.StatusCode.UNAVAILABLE], key=str), outcomes
    results = generate_concurrently(two, UNRELATED, max_tokens=4)
    assert all(isinstance(r, api.GenerateResponse) for r in results), results


def test_a_restarted_replica_is_used_again(two):
    two.start_engine(1)
    for _ in range(20):   # the gateway's poller sees it within a poll interval once its channel reconnects
        results = generate_concurrently(two, UNRELATED, max_tokens=4)
        assert all(isinstance(r, api.GenerateResponse) for r in results), results
        if two.load(1).prefix_cache_queries > 0:
            break
        time.sleep(0.5)
    assert two.load(1).prefix_cache_queries > 0
