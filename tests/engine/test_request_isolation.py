"""No request can take the engine down or leave its client waiting (issue 14): an exception planted in one
request's processing fails that request alone, with its blocks freed, while the others produce exactly what they
produce without it; a whole step that raises fails only the requests it carried; a request the engine drops without
a result still gets an end. Beam search ends with a result for every length_penalty the API allows (and for the
values that used to hang it), and a denormal temperature is greedy."""
from __future__ import annotations

import queue
import time
from dataclasses import replace

import pytest

from engine_svc.config import EngineConfig
from engine_svc.core.request import FinishReason, SamplingParams
from engine_svc.engine import Engine
from engine_svc.service.engine_loop import EngineLoop
from engine_svc.service.proto_convert import params_from_pb
from protos.tandem.internal.v1 import engine_pb2 as pb
from tests.engine.tiny_models import write_tiny_llama

PROMPTS = {"a": [5, 17, 99, 3, 250, 42, 7], "b": [1, 2, 30, 31, 44], "c": [300, 301, 302, 303, 304, 305]}
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Engine:
    tiny = write_tiny_llama(tmp_path_factory.mktemp("tiny-isolation"), seed=3)
    return Engine(EngineConfig(model=str(tiny), device="cpu", dtype="float32", block_size=4, num_kv_blocks=96,
                               max_num_seqs=8, max_num_batched_tokens=64))


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    got = {rid: {"tokens": [], "finish": None, "error": ""} for rid in requests}
    while engine.has_work():
        for o in engine.step():
            got[o.request_id]["tokens"] += o.new_token_ids
            if o.last:
                got[o.request_id]["finish"], got[o.request_id]["error"] = o.finish_reason, o.error
    return got


def reference(base: Engine, rids) -> dict[str, list[int]]:
    got = run(base.with_scheduling(), {rid: (PROMPTS[rid], GREEDY) for rid in rids})
    return {rid: g["tokens"] for rid, g in got.items()}


def assert_clean(engine: Engine) -> None:
    assert engine.kv.num_used_blocks == 0 and engine.check_integrity() == []
    assert not engine.scheduler.requests and not engine.scheduler.groups


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_exception_in_one_requests_results_fails_it_alone(base, monkeypatch, async_scheduling):
    expected = reference(base, "ac")
    engine = base.with_scheduling(async_scheduling=async_scheduling)
    real = engine.scheduler._stop_reason
    seen = {"b": 0}

    def planted(req, token, position):
        if req.external_id == "b":
            seen["b"] += 1
            if seen["b"] == 3:   # b's third token
                raise ZeroDivisionError("planted in b")
        return real(req, token, position)

    monkeypatch.setattr(engine.scheduler, "_stop_reason", planted)
    got = run(engine, {rid: (PROMPTS[rid], GREEDY) for rid in "abc"})
    assert got["b"]["finish"] is FinishReason.FAILED and got["b"]["error"] == "ZeroDivisionError: planted in b"
    assert len(got["b"]["tokens"]) == 2                  # what it had before the failure, nothing after
    for rid in "ac":
        assert got[rid]["tokens"] == expected[rid] and got[rid]["finish"] is FinishReason.LENGTH
    assert_clean(engine)


def test_a_failing_group_member_ends_the_whole_group(base, monkeypatch):
    engine = base.with_scheduling()
    real = engine.scheduler._stop_reason

    def planted(req, token, position):
        if req.request_id.endswith("#1") and req.num_output_tokens == 2:
            raise RuntimeError("planted in a member")
        return real(req, token, position)

    monkeypatch.setattr(engine.scheduler, "_stop_reason", planted)
    group = SamplingParams(temperature=0.8, seed=1, max_tokens=12, n=3, best_of=3, ignore_eos=True)
    got = run(engine, {"g": (PROMPTS["a"], group), "c": (PROMPTS["c"], GREEDY)})
    assert got["g"]["finish"] is FinishReason.FAILED and "planted in a member" in got["g"]["error"]
    assert got["c"]["tokens"] == reference(base, "c")["c"]
    assert_clean(engine)


def test_a_step_that_raises_fails_only_the_requests_it_carried(base, monkeypatch):
    expected = reference(base, "c")
    engine = base.with_scheduling()
    engine.add_request("a", PROMPTS["a"], GREEDY)
    engine.add_request("b", PROMPTS["b"], GREEDY)
    real = engine.executor.execute
    calls = {"n": 0}

    def broken(out):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the model broke")
        return real(out)

    monkeypatch.setattr(engine.executor, "execute", broken)
    engine.step()                                         # both prefill
    failed = engine.step()                                # both decode: the step raises
    assert {(o.request_id, o.finish_reason, o.last) for o in failed} == {
        ("a", FinishReason.FAILED, True), ("b", FinishReason.FAILED, True)}
    assert all(o.error == "RuntimeError: the model broke" for o in failed)
    assert_clean(engine)
    got = run(engine, {"c": (PROMPTS["c"], GREEDY)})      # the engine goes on serving
    assert got["c"]["tokens"] == expected["c"]


class _Sink:
    def __init__(self) -> None:
        self.events: queue.SimpleQueue = queue.SimpleQueue()

    def emit(self, outputs) -> None:
        for o in outputs:
            self.events.put((o.request_id, o.new_token_ids, o.finish_reason, o.error, o.last))

    def reject(self, request_id, error) -> None:
        self.events.put((request_id, [], "rejected", str(error), True))

    def until_last(self, rids: set[str], timeout: float = 60) -> dict[str, list]:
        got: dict[str, list] = {rid: [] for rid in rids}
        pending = set(rids)
        while pending:
            rid, ids, finish, error, last = self.events.get(timeout=timeout)
            got[rid].append((ids, finish, error))
            if last:
                pending.discard(rid)
        return got


def test_the_loop_survives_admission_and_orphan_failures(base, monkeypatch):
    engine = base.with_scheduling()
    real_add = engine.scheduler.add_request

    def add(request_id, *args, **kwargs):
        if request_id == "bad-admit":
            raise KeyError("planted at admission")
        return real_add(request_id, *args, **kwargs)

    monkeypatch.setattr(engine.scheduler, "add_request", add)
    real_update = engine.scheduler.update

    def update(out, *args, **kwargs):   # silently drops "lost" without a last output: a bug the loop must catch
        outputs = real_update(out, *args, **kwargs)
        if "lost" in engine.scheduler.requests:
            engine.scheduler.abort("lost")
        return [o for o in outputs if o.request_id != "lost"]

    monkeypatch.setattr(engine.scheduler, "update", update)
    loop = EngineLoop(engine)
    sink = _Sink()
    loop.start()
    try:
        for rid in ("bad-admit", "lost", "ok"):
            loop.submit(rid, PROMPTS["a"], GREEDY, sink)
        got = sink.until_last({"bad-admit", "lost", "ok"})
        assert loop._thread.is_alive()
    finally:
        loop.stop()
    assert got["bad-admit"] == [([], FinishReason.FAILED, "KeyError: 'planted at admission'")]
    assert got["lost"][-1] == ([], FinishReason.FAILED, "the engine ended the request without a result")
    ok = [t for ids, _, _ in got["ok"] for t in ids]
    assert ok == reference(base, "a")["a"] and got["ok"][-1][1] is FinishReason.LENGTH
    assert_clean(engine)


def test_engine_ids_are_digits_so_they_never_meet_member_ids(base):
    loop = EngineLoop(base)
    ids = [loop.new_request_id() for _ in range(3)]
    assert ids == ["0", "1", "2"] and all(i.isdigit() for i in ids)


@pytest.mark.parametrize("length_penalty", [-30.0, -100.00001, -10.0, 10.0, 0.0])
def test_beam_search_always_ends_with_its_beams(base, length_penalty):
    engine = base.with_scheduling()
    beams = SamplingParams(temperature=0.0, max_tokens=6, n=2, best_of=2, use_beam_search=True,
                           length_penalty=length_penalty)
    engine.add_request("beam", PROMPTS["a"], beams)
    outs = []
    for _ in range(100):
        if not engine.has_work():
            break
        outs += engine.step()
    assert [o.index for o in outs] == [0, 1] and outs[-1].last
    assert all(o.new_token_ids and o.finish_reason in (FinishReason.LENGTH, FinishReason.STOP_TOKEN) for o in outs)
    assert_clean(engine)


@pytest.mark.parametrize("value", [1e10, -3.4e38, 3.4e38, -30.0, -10.5, float("nan"), float("inf")])
def test_length_penalty_outside_its_range_is_refused(value):
    p = pb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=4, use_beam_search=True, best_of=2, n=1,
                          length_penalty=value)
    with pytest.raises(ValueError, match=r"length_penalty must be in \[-10, 10\]"):
        params_from_pb(p, 320)


@pytest.mark.parametrize("temperature", [1.4e-45, 1e-30, 9e-6])
def test_denormal_temperature_is_greedy(base, temperature):
    p = params_from_pb(pb.SamplingParams(temperature=temperature, top_p=1.0, max_tokens=12, ignore_eos=True), 320)
    assert p.greedy
    got = run(base.with_scheduling(), {"a": (PROMPTS["a"], p)})
    assert got["a"]["tokens"] == reference(base, "a")["a"]


def test_an_engine_whose_loop_dies_exits_non_zero(tmp_path):
    """The process, not just the coroutine: a launcher or compose must see the crash to restart the engine."""
    import subprocess
    import sys

    tiny = write_tiny_llama(tmp_path / "tiny", seed=1)
    plant = ("import engine_svc.service.engine_loop as m\n"
             "def crash(self, block):\n    raise RuntimeError('planted loop crash')\n"
             "m.EngineLoop._drain = crash\n"
             "import runpy, sys\n"
             f"sys.argv = ['engine_svc', '--model', {str(tiny)!r}, '--port', '0', '--device', 'cpu', "
             "'--dtype', 'float32', '--num-kv-blocks', '16']\n"
             "runpy.run_module('engine_svc', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", plant], capture_output=True, text=True, timeout=180)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "the engine loop died: RuntimeError: planted loop crash" in out.stderr


class _CallsAtOnce:
    """Stands in for the asyncio loop the engine service's sink hands its deltas to."""

    def call_soon_threadsafe(self, fn, *args) -> None:
        fn(*args)


def test_an_output_the_service_cannot_send_fails_that_request_alone(base, monkeypatch):
    """An output no proto can carry (a token id of -1 once leaked this way) ends its request with FAILED, its
    blocks freed, while the engine loop lives on and the other request gets its exact tokens."""
    from engine_svc.service.server import _QueueSink

    engine = base.with_scheduling()
    real_update = engine.scheduler.update

    def update(out, *args, **kwargs):
        return [replace(o, new_token_ids=[-1]) if o.request_id == "bad" else o
                for o in real_update(out, *args, **kwargs)]

    monkeypatch.setattr(engine.scheduler, "update", update)
    sink = _QueueSink(_CallsAtOnce())
    sink.names.update({"bad": "client-bad", "ok": "client-ok"})
    loop = EngineLoop(engine)
    loop.start()
    try:
        for rid in ("bad", "ok"):
            loop.submit(rid, PROMPTS["a"], GREEDY, sink)
        deltas: dict[str, list] = {"client-bad": [], "client-ok": []}
        ended: set[str] = set()
        deadline = time.monotonic() + 60
        while ended != set(deltas):
            assert time.monotonic() < deadline and loop._thread.is_alive(), "the engine loop died"
            for _, d in sink.queue.get_nowait() if not sink.queue.empty() else []:
                deltas[d.request_id].append(d)
                if d.last:
                    ended.add(d.request_id)
        assert loop._thread.is_alive()
    finally:
        loop.stop()
    (bad,) = deltas["client-bad"]
    assert bad.finish == pb.ENGINE_FINISH_FAILED and bad.last
    assert bad.error.startswith("the engine could not send its output: ValueError")
    assert [t for d in deltas["client-ok"] for t in d.token_ids] == reference(base, "a")["a"]
    assert_clean(engine)
