"""LoRA adapters in the engine on a tiny Llama, with a fake LoRAManager (tests/engine/fake_lora.py; the real
adapter math is tested with engine_svc.lora): admission checks, load/list errors, batches that mix adapters and the
base model, and the unload policy: new requests are refused at once, the ones already admitted run to their normal
end, then the adapter is dropped exactly once, with every KV block and device slot free."""
from __future__ import annotations

import queue
import threading
from dataclasses import replace

import pytest

from engine_svc.adapters import AdapterExists, AdapterNotFound, InvalidAdapter, LoRANotEnabled, UnknownAdapter
from engine_svc.config import EngineConfig
from engine_svc.core.request import FinishReason, SamplingParams
from engine_svc.engine import Engine
from engine_svc.engine_loop import EngineLoop
from tests.engine.fake_lora import FakeLoRAManager, write_adapter_dir
from tests.engine.tiny_models import write_tiny_llama

LONG = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-lora"), seed=3)


@pytest.fixture(scope="module")
def base(tiny) -> Engine:
    return Engine(EngineConfig(model=str(tiny), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64,
                               max_num_seqs=8, max_num_batched_tokens=64))


@pytest.fixture
def adapter_dir(tmp_path):
    return write_adapter_dir(tmp_path / "a")


def with_lora(base: Engine, manager: FakeLoRAManager, **changes) -> Engine:
    """A fresh engine over base's model and KV tensors, with the fake manager."""
    return Engine(replace(base.runner.config, **changes), base.runner, manager)


def run_to_end(engine: Engine, on_step=None) -> dict[str, tuple[list[int], FinishReason | None]]:
    out: dict[str, tuple[list[int], FinishReason | None]] = {}
    while engine.has_work():
        for o in engine.step():
            tokens, _ = out.get(o.request_id, ([], None))
            out[o.request_id] = (tokens + o.new_token_ids, o.finish_reason)
        if on_step is not None:
            on_step()
    return out


def test_unknown_adapter_is_refused_before_admission(base, adapter_dir):
    engine = with_lora(base, FakeLoRAManager())
    with pytest.raises(UnknownAdapter, match="'nope' is not loaded"):
        engine.add_request("r", [1, 2, 3], LONG, adapter="nope")
    assert not engine.scheduler.has_work
    plain = base.with_scheduling()
    assert not plain.adapters.enabled
    with pytest.raises(UnknownAdapter, match="LoRA is not enabled"):
        plain.add_request("r", [1, 2, 3], LONG, adapter="a")
    for call in (lambda: plain.load_adapter("a", str(adapter_dir)), lambda: plain.begin_unload_adapter("a"),
                 plain.adapter_statuses):
        with pytest.raises(LoRANotEnabled, match="--enable-lora"):
            call()


def test_load_list_and_each_load_error(base, tmp_path):
    fake = FakeLoRAManager(max_rank=16)
    engine = with_lora(base, fake)
    info = engine.load_adapter("b", str(write_adapter_dir(tmp_path / "b", rank=8)))
    assert (info.name, info.rank, info.alpha, info.target_modules) == ("b", 8, 16.0, ("q_proj", "v_proj"))
    engine.load_adapter("a", str(write_adapter_dir(tmp_path / "a2", rank=4)))
    with pytest.raises(AdapterExists, match="'a' is already loaded"):
        engine.load_adapter("a", str(tmp_path / "b"))
    with pytest.raises(InvalidAdapter, match="rank 32 exceeds max_lora_rank 16"):
        engine.load_adapter("big", str(write_adapter_dir(tmp_path / "big", rank=32)))
    with pytest.raises(InvalidAdapter, match=r"cannot serve target modules \['lm_head'\]"):
        engine.load_adapter("odd", str(write_adapter_dir(tmp_path / "odd", target_modules=("q_proj", "lm_head"))))
    with pytest.raises(InvalidAdapter, match="no adapter_config.json"):
        engine.load_adapter("gone", str(tmp_path / "missing"))
    for bad in ("", "-x", "a b", "x" * 65):
        with pytest.raises(InvalidAdapter, match="name:"):
            engine.load_adapter(bad, str(tmp_path / "b"))
    statuses = engine.adapter_statuses()
    assert [(s.info.name, s.info.rank, s.unloading, s.num_requests) for s in statuses] == [
        ("a", 4, False, 0), ("b", 8, False, 0)]
    assert set(fake.loaded) == {"a", "b"}     # the refused loads left nothing behind


def test_one_batch_mixes_adapters_and_the_base_model(base, tmp_path):
    fake = FakeLoRAManager(max_loras=2)
    engine = with_lora(base, fake)
    for name in ("a", "b"):
        engine.load_adapter(name, str(write_adapter_dir(tmp_path / name)))
    launched = []
    execute = engine.runner.execute

    def spy(out):
        launched.append(([(s.request.request_id, s.adapter) for s in out.scheduled], dict(out.lora_slots)))
        return execute(out)

    engine.runner.execute = spy
    try:
        for rid, adapter in (("ra", "a"), ("base", None), ("rb", "b")):
            engine.add_request(rid, [5, 6, 7, 8, 9], LONG, adapter=adapter)
        res = run_to_end(engine)
    finally:
        del engine.runner.execute
    first, slots = launched[0]
    assert first == [("ra", "a"), ("base", None), ("rb", "b")]
    assert sorted(slots) == ["a", "b"] and sorted(slots.values()) == [0, 1]
    assert len(launched) == 6                  # all three in every step: six steps for six tokens each
    assert all(res[r][1] is FinishReason.LENGTH and len(res[r][0]) == 6 for r in ("ra", "base", "rb"))
    assert engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_unload_lets_admitted_requests_finish_then_drops_once(base, adapter_dir, async_scheduling):
    fake = FakeLoRAManager()
    engine = with_lora(base, fake, async_scheduling=async_scheduling)
    engine.load_adapter("a", str(adapter_dir))
    for rid, adapter in (("a1", "a"), ("a2", "a"), ("base", None)):
        engine.add_request(rid, [1, 2, 3, 4, 5], LONG, adapter=adapter)
    outputs: dict[str, list[int]] = {}
    for _ in range(2):
        for o in engine.step():
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    engine.begin_unload_adapter("a")
    with pytest.raises(UnknownAdapter, match="'a' is being unloaded"):
        engine.add_request("late", [1, 2, 3], LONG, adapter="a")
    with pytest.raises(AdapterExists, match="still being unloaded"):
        engine.load_adapter("a", str(adapter_dir))
    [status] = engine.adapter_statuses()
    assert (status.info.name, status.unloading, status.num_requests) == ("a", True, 2)
    assert engine.drop_drained_adapters() == []

    dropped_at: list[tuple[int, set[str]]] = []

    def after_step():
        unfinished = {r for r in ("a1", "a2") if r in engine.scheduler.requests}
        for name, drained in engine.drop_drained_adapters():
            dropped_at.append((drained, unfinished))

    rest = run_to_end(engine, after_step)
    for rid in ("a1", "a2", "base"):
        assert len(outputs.get(rid, []) + rest[rid][0]) == 6 and rest[rid][1] is FinishReason.LENGTH
    assert dropped_at == [(2, set())]          # once, after both had finished, counting both as drained
    assert [c for c in fake.calls if c[0] == "unload"] == [("unload", "a")]
    assert fake.loaded == {} and fake.slots == {}
    assert engine.kv.num_used_blocks == 0 and engine.check_integrity() == []
    engine.load_adapter("a", str(adapter_dir))  # the name is free again
    assert [s.info.name for s in engine.adapter_statuses()] == ["a"]


def test_unload_of_an_idle_adapter_drops_at_once_and_unknown_is_not_found(base, adapter_dir):
    fake = FakeLoRAManager()
    engine = with_lora(base, fake)
    engine.load_adapter("a", str(adapter_dir))
    engine.begin_unload_adapter("a")
    assert engine.drop_drained_adapters() == [("a", 0)]
    with pytest.raises(AdapterNotFound, match="'a' is not loaded"):
        engine.begin_unload_adapter("a")


class _Sink:
    def __init__(self, events: queue.SimpleQueue) -> None:
        self.events = events

    def emit(self, outputs) -> None:
        for o in outputs:
            self.events.put(("output", o.request_id, o.finish_reason))

    def reject(self, request_id, error) -> None:
        self.events.put(("reject", request_id, type(error).__name__))


def test_through_the_loop_the_unload_answers_after_the_last_output(base, adapter_dir):
    engine = with_lora(base, FakeLoRAManager())
    loop = EngineLoop(engine)
    events: queue.SimpleQueue = queue.SimpleQueue()
    sink = _Sink(events)
    loop.start()
    try:
        replied = threading.Event()
        loop.load_adapter("a", str(adapter_dir), lambda r: (events.put(("loaded", r.name)), replied.set()))
        assert replied.wait(30)
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        loop.submit("a1", [1, 2, 3, 4, 5], params, sink, adapter="a")
        loop.submit("b1", [1, 2, 3, 4, 5], params, sink)
        loop.unload_adapter("a", lambda r: events.put(("unloaded", r)))
        loop.submit("a2", [1, 2, 3], params, sink, adapter="a")     # after the unload: refused
        loop.load_adapter("a", str(adapter_dir), lambda r: events.put(("reload", type(r).__name__)))
        seen = []
        while ("unloaded", ("a", 1)) not in seen or ("output", "b1", FinishReason.LENGTH) not in seen:
            seen.append(events.get(timeout=60))
    finally:
        loop.stop()
    assert seen[0] == ("loaded", "a")
    assert ("reject", "a2", "UnknownAdapter") in seen and ("reload", "AdapterExists") in seen
    a1 = [e for e in seen if e[:2] == ("output", "a1")]
    assert len(a1) == 40 and a1[-1][2] is FinishReason.LENGTH
    assert seen.index(a1[-1]) < seen.index(("unloaded", ("a", 1)))   # the answer came after a1's last token
    assert not engine.scheduler.has_work and engine.kv.num_used_blocks == 0
