"""LoRA adapters through the engine's request plumbing on a tiny Llama (fp32, CPU) with the real LoRAManager:
admission checks, each load error, batches that mix adapters and the base model within max_loras (tokens equal
transformers with the adapter merged into the weights), and the unload policy: new requests are refused at once,
the ones already admitted run to their normal end with the adapter's tokens, then the adapter is dropped exactly
once, with every KV block and device slot free."""
from __future__ import annotations

import queue
import threading

import pytest
import torch

from engine_svc.adapters import (AdapterExists, AdapterNotFound, InvalidAdapter, LoRANotEnabled, TooManyAdapters,
                                 UnknownAdapter)
from engine_svc.core.request import FinishReason, SamplingParams
from engine_svc.engine import Engine
from engine_svc.service.engine_loop import EngineLoop
from tests.engine.family_checks import make_engine
from tests.engine.lora_files import MLP, hf_merged, write_lora_adapter
from tests.engine.tiny_models import write_tiny_llama

STEPS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
PROMPT = [5, 17, 99, 3, 250, 42, 7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-lora"), seed=5)


@pytest.fixture(scope="module")
def adapter_dirs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": write_lora_adapter(tiny, root / "a", r=4, alpha=8, seed=1),
            "b": write_lora_adapter(tiny, root / "b", r=8, alpha=8, targets=("q_proj", "o_proj") + MLP, seed=2),
            "c": write_lora_adapter(tiny, root / "c", r=2, alpha=4, targets=("k_proj", "v_proj"), seed=3)}


@pytest.fixture(scope="module")
def reference(tiny, adapter_dirs):
    """Greedy tokens of transformers with each adapter merged in (None: the base model)."""
    cache = {}

    def tokens(adapter: str | None, prompt=tuple(PROMPT), steps: int = STEPS) -> list[int]:
        if (adapter, prompt, steps) not in cache:
            model = hf_merged(tiny, adapter_dirs[adapter] if adapter else None)
            seq = list(prompt)
            with torch.no_grad():
                for _ in range(steps):
                    seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            cache[(adapter, prompt, steps)] = seq[len(prompt):]
        return cache[(adapter, prompt, steps)]
    return tokens


@pytest.fixture(scope="module")
def lora_base(tiny) -> Engine:
    return make_engine(tiny, enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=4,
                       max_num_batched_tokens=64)


@pytest.fixture
def engine(lora_base):
    """A fresh engine over the shared model; the adapters it loads are gone afterwards."""
    yield lora_base.with_scheduling()
    for info in lora_base.runner.lora.list():
        lora_base.runner.lora.unload(info.name)


def run_to_end(engine: Engine, on_step=None) -> dict[str, tuple[list[int], FinishReason | None]]:
    out: dict[str, tuple[list[int], FinishReason | None]] = {}
    while engine.has_work():
        for o in engine.step():
            tokens, _ = out.get(o.request_id, ([], None))
            out[o.request_id] = (tokens + o.new_token_ids, o.finish_reason)
        if on_step is not None:
            on_step()
    return out


def test_unknown_adapter_is_refused_before_admission(tiny, engine, adapter_dirs):
    with pytest.raises(UnknownAdapter, match="'nope' is not loaded"):
        engine.add_request("r", [1, 2, 3], GREEDY, adapter="nope")
    assert not engine.scheduler.has_work
    plain = make_engine(tiny)
    with pytest.raises(UnknownAdapter, match="LoRA is not enabled"):
        plain.add_request("r", [1, 2, 3], GREEDY, adapter="a")
    for call in (lambda: plain.load_adapter("a", str(adapter_dirs["a"])), lambda: plain.begin_unload_adapter("a"),
                 plain.adapter_statuses):
        with pytest.raises(LoRANotEnabled, match="--enable-lora"):
            call()


def test_load_list_and_each_load_error(tiny, engine, adapter_dirs, tmp_path):
    info = engine.load_adapter("b", str(adapter_dirs["b"]))
    assert (info.name, info.rank, info.alpha) == ("b", 8, 8.0)
    assert sorted(info.target_modules) == sorted(("q_proj", "o_proj") + MLP)
    engine.load_adapter("a", str(adapter_dirs["a"]))
    with pytest.raises(AdapterExists, match="'a' is already loaded"):
        engine.load_adapter("a", str(adapter_dirs["b"]))
    with pytest.raises(InvalidAdapter, match="rank 32 exceeds max_lora_rank 16"):
        engine.load_adapter("big", str(write_lora_adapter(tiny, tmp_path / "big", r=32, alpha=32)))
    with pytest.raises(InvalidAdapter, match=r"unsupported LoRA target modules \['lm_head'\]"):
        engine.load_adapter("odd", str(write_lora_adapter(tiny, tmp_path / "odd", r=4, alpha=4,
                                                          targets=("q_proj", "lm_head"))))
    with pytest.raises(InvalidAdapter, match="is not a directory"):
        engine.load_adapter("gone", str(tmp_path / "missing"))
    for bad in ("", "-x", "a b", "x" * 65):
        with pytest.raises(InvalidAdapter, match="name:"):
            engine.load_adapter(bad, str(adapter_dirs["a"]))
    statuses = engine.adapter_statuses()
    assert [(s.info.name, s.info.rank, s.unloading, s.num_requests) for s in statuses] == [
        ("a", 4, False, 0), ("b", 8, False, 0)]
    engine.load_adapter("c", str(adapter_dirs["c"]))
    engine.load_adapter("a2", str(adapter_dirs["a"]))
    with pytest.raises(TooManyAdapters, match="4 adapters are loaded"):    # max_cpu_loras
        engine.load_adapter("c2", str(adapter_dirs["c"]))
    assert sorted(i.name for i in engine.runner.lora.list()) == ["a", "a2", "b", "c"]   # refusals left nothing


def test_one_batch_mixes_adapters_and_the_base_model_within_max_loras(engine, adapter_dirs, reference):
    for name in ("a", "b", "c"):
        engine.load_adapter(name, str(adapter_dirs[name]))
    steps = []
    execute = engine.executor.execute

    def spy(out):
        steps.append([(s.request.request_id, s.adapter) for s in out.scheduled])
        return execute(out)

    engine.executor.execute = spy
    try:
        for rid, adapter in (("ra", "a"), ("base", None), ("rb", "b"), ("rc", "c"), ("ra2", "a")):
            engine.add_request(rid, PROMPT, GREEDY, adapter=adapter)
        res = run_to_end(engine)
    finally:
        engine.executor.execute = execute
    assert steps[0] == [("ra", "a"), ("base", None), ("rb", "b"), ("ra2", "a")]   # c would be a third adapter
    assert all(len({a for _, a in step if a}) <= 2 for step in steps)
    assert ("rc", "c") in steps[STEPS]                   # c joins the step after a's requests are done
    for rid, adapter in (("ra", "a"), ("base", None), ("rb", "b"), ("rc", "c"), ("ra2", "a")):
        assert res[rid] == (reference(adapter), FinishReason.LENGTH), rid
    assert len({tuple(reference(a)) for a in (None, "a", "b", "c")}) == 4   # each adapter changes the tokens
    assert engine.kv.num_used_blocks == 0


def test_the_prefix_cache_is_not_shared_across_adapters(engine, adapter_dirs, reference):
    engine.load_adapter("a", str(adapter_dirs["a"]))
    prompt = tuple(range(40, 57))                        # 17 tokens: four full blocks of 4
    for rid, adapter in (("base", None), ("a", "a"), ("a-again", "a")):
        engine.add_request(rid, list(prompt), GREEDY, adapter=adapter)
        res = run_to_end(engine)
        assert res[rid] == (reference(adapter, prompt), FinishReason.LENGTH), rid
    assert engine.kv.prefix_stats.hits == 16             # only a-again hit: a's four blocks, none of the base's


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_unload_lets_admitted_requests_finish_then_drops_once(engine, adapter_dirs, reference, async_scheduling):
    engine = engine.with_scheduling(async_scheduling=async_scheduling)
    lora = engine.runner.lora
    engine.load_adapter("a", str(adapter_dirs["a"]))
    for rid, adapter in (("a1", "a"), ("a2", "a"), ("base", None)):
        engine.add_request(rid, PROMPT, GREEDY, adapter=adapter)
    outputs: dict[str, list[int]] = {}
    for _ in range(2):
        for o in engine.step():
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert "a" in lora.resident()
    engine.begin_unload_adapter("a")
    with pytest.raises(UnknownAdapter, match="'a' is being unloaded"):
        engine.add_request("late", PROMPT, GREEDY, adapter="a")
    with pytest.raises(AdapterExists, match="still being unloaded"):
        engine.load_adapter("a", str(adapter_dirs["a"]))
    [status] = engine.adapter_statuses()
    assert (status.info.name, status.unloading, status.num_requests) == ("a", True, 2)
    assert engine.drop_drained_adapters() == []

    dropped_at: list[tuple[str, int, set[str]]] = []

    def after_step():
        unfinished = {r for r in ("a1", "a2") if r in engine.scheduler.requests}
        for name, drained in engine.drop_drained_adapters():
            dropped_at.append((name, drained, unfinished))

    rest = run_to_end(engine, after_step)
    for rid, adapter in (("a1", "a"), ("a2", "a"), ("base", None)):
        assert outputs.get(rid, []) + rest[rid][0] == reference(adapter) and rest[rid][1] is FinishReason.LENGTH
    assert dropped_at == [("a", 2, set())]       # once, after both had finished, counting both as drained
    assert not lora.has("a") and lora.resident() == {}
    assert engine.kv.num_used_blocks == 0 and engine.check_integrity() == []
    engine.load_adapter("a", str(adapter_dirs["a"]))   # the name is free again
    assert [s.info.name for s in engine.adapter_statuses()] == ["a"]


def test_unload_of_an_idle_adapter_drops_at_once_and_unknown_is_not_found(engine, adapter_dirs):
    engine.load_adapter("a", str(adapter_dirs["a"]))
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


def test_through_the_loop_the_unload_answers_after_the_last_output(engine, adapter_dirs):
    loop = EngineLoop(engine)
    events: queue.SimpleQueue = queue.SimpleQueue()
    sink = _Sink(events)
    loop.start()
    try:
        replied = threading.Event()
        loop.load_adapter("a", str(adapter_dirs["a"]), lambda r: (events.put(("loaded", r.name)), replied.set()))
        assert replied.wait(30)
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        loop.submit("a1", PROMPT, params, sink, adapter="a")
        loop.submit("b1", PROMPT, params, sink)
        loop.unload_adapter("a", lambda r: events.put(("unloaded", r)))
        loop.submit("a2", PROMPT, params, sink, adapter="a")     # after the unload: refused
        loop.load_adapter("a", str(adapter_dirs["a"]), lambda r: events.put(("reload", type(r).__name__)))
        seen = []
        while ("unloaded", ("a", 1)) not in seen or ("output", "b1", FinishReason.LENGTH) not in seen:
            seen.append(events.get(timeout=60))
    finally:
        loop.stop()
    assert seen[0] == ("loaded", "a")
    assert ("reject", "a2", "UnknownAdapter") in seen and ("reload", "AdapterExists") in seen
    a1 = [e for e in seen if e[:2] == ("output", "a1")]
    assert len(a1) == 30 and a1[-1][2] is FinishReason.LENGTH
    assert seen.index(a1[-1]) < seen.index(("unloaded", ("a", 1)))   # the answer came after a1's last token
    assert not engine.scheduler.has_work and engine.kv.num_used_blocks == 0
    assert not engine.runner.lora.has("a")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_mixed_batch_and_an_unload_under_async_scheduling(tiny, adapter_dirs, reference):
    """CUDA defaults: the triton backend and LoRA kernels, decode CUDA graphs, asynchronous scheduling (the drop
    must wait for the step in flight)."""
    engine = make_engine(tiny, device="cuda", enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=4,
                         max_num_batched_tokens=64)
    assert engine.async_scheduling
    for name in ("a", "b", "c"):
        engine.load_adapter(name, str(adapter_dirs[name]))
    requests = (("ra", "a"), ("base", None), ("rb", "b"), ("rc", "c"), ("ra2", "a"))
    for rid, adapter in requests:
        engine.add_request(rid, PROMPT, GREEDY, adapter=adapter)
    outputs: dict[str, list[int]] = {}
    for _ in range(2):
        for o in engine.step():
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    engine.begin_unload_adapter("a")
    with pytest.raises(UnknownAdapter):
        engine.add_request("late", PROMPT, GREEDY, adapter="a")
    dropped = []
    rest = run_to_end(engine, lambda: dropped.extend(
        (name, n, {r for r in ("ra", "ra2") if r in engine.scheduler.requests})
        for name, n in engine.drop_drained_adapters()))
    for rid, adapter in requests:
        assert outputs.get(rid, []) + rest[rid][0] == reference(adapter), rid
    assert dropped == [("a", 2, set())]
    assert "a" not in engine.runner.lora.resident() and not engine.runner.lora.has("a")
    assert engine.kv.num_used_blocks == 0 and engine.check_integrity() == []
