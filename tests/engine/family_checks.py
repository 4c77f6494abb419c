"""Shared checks of a model family against Hugging Face transformers on a tiny checkpoint (fp32, CPU): the engine's
logits step by step through the paged cache, and greedy continuations."""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import torch

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 9, 11, 13], [1, 2], [300, 301, 302, 303, 304, 305, 306, 307, 308]]


def triton_unavailable() -> str | None:
    """Why the Triton backend cannot run here, or None. Importing engine_svc.kernels first switches the interpreter
    on when there is no CUDA (it must happen before anything imports triton)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        importlib.import_module("engine_svc.kernels")
    except ImportError as e:
        return str(e)
    return None


def hf_model(path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def engine_config(path, **kw) -> EngineConfig:
    """The tests' engine on a tiny checkpoint: CPU, fp32, blocks of 4 tokens; kw overrides."""
    cfg = dict(model=str(path), device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_num_seqs=8)
    cfg.update(kw)
    return EngineConfig(**cfg)


def make_engine(path, **kw) -> Engine:
    return Engine(engine_config(path, **kw))


@contextmanager
def single_and_parallel(path, **parallel):
    """(one-process engine, engine over worker processes with the `parallel` sizes) on the same checkpoint; the
    workers are stopped, and gone, afterwards."""
    split = make_engine(path, **parallel)
    try:
        yield make_engine(path), split
    finally:
        split.shutdown()
    assert all(not p.is_alive() for p in split.executor.workers)


def run_mixed(engine: Engine) -> tuple[dict, int, int]:
    """32 tokens for four requests through 8-token chunks and 24 KV blocks (preemption), a request with n=2
    (seeded sampling), and a second request on a first one's prompt once that one's prompt is computed
    (prefix-cache hit); returns the tokens by (request, index), the preemptions and the prompt tokens found in the
    cache."""
    e = engine.with_scheduling(num_kv_blocks=24, max_num_batched_tokens=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    e.add_request("a", PROMPTS[0] + [21, 22, 23, 24, 25], greedy)
    e.add_request("n2", PROMPTS[2], SamplingParams(temperature=0.9, seed=7, n=2, best_of=2, max_tokens=32,
                                                   ignore_eos=True))
    e.add_request("b", PROMPTS[1], greedy)
    tokens: dict = {}
    while e.has_work():
        for o in e.step():
            if o.request_id == "a" and ("a", 0) not in tokens:   # "a"'s prompt blocks are cached now
                e.add_request("a-again", PROMPTS[0] + [21, 22, 23, 24, 25], greedy)
            tokens.setdefault((o.request_id, o.index), []).extend(o.new_token_ids)
    assert e.check_integrity() == [] and e.kv.num_used_blocks == 0
    return tokens, e.scheduler.num_preemptions, e.kv.prefix_stats.hits


def stepped_logits(engine: Engine, prompts, steps: int, adapters=None):
    """Runs greedy steps through the scheduler; yields (sequence so far, the engine's logits for its next token).
    adapters: each prompt's LoRA adapter name (None: the base model)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy, adapter=adapters[i] if adapters else None)
    seqs = {f"r{i}": list(p) for i, p in enumerate(prompts)}
    while engine.has_work():
        out = engine.scheduler.schedule()
        logits = engine.runner.forward_logits(out)
        sampling = [s for s in out.scheduled if s.samples]
        for row, s in enumerate(sampling):
            yield list(seqs[s.request.request_id]), logits[row]
        sampled = logits.argmax(-1).tolist()
        for s, tok in zip(sampling, sampled):
            seqs[s.request.request_id].append(tok)
        engine.scheduler.update(out, sampled)


def assert_same_stepped_logits(reference: Engine, other: Engine, prompts=PROMPTS, steps: int = 6) -> None:
    """Two engines over the same checkpoint (one process, and split over ranks) give the same sequences and, at
    every prefill and decode step, logits within 1e-4."""
    checked = 0
    with torch.no_grad():
        for (seq_a, a), (seq_b, b) in zip(stepped_logits(reference, prompts, steps),
                                          stepped_logits(other, prompts, steps), strict=True):
            assert seq_a == seq_b
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == len(prompts) * steps


def assert_logits_match(engine: Engine, ref, prompts=PROMPTS, steps: int = 8) -> None:
    """Prefill and paged-decode logits equal the reference's full forward at every step (block size 4: the decodes
    cross block boundaries); every block is free afterwards."""
    checked = 0
    with torch.no_grad():
        for seq, logits in stepped_logits(engine, prompts, steps):
            expected = ref(torch.tensor([seq])).logits[0, -1].float()
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == len(prompts) * steps
    assert engine.kv.num_used_blocks == 0


def assert_greedy_matches(engine: Engine, ref, prompts=PROMPTS, n: int = 16) -> list[list[int]]:
    """n greedy tokens per prompt equal the reference's (full forwards, so no cache layout of transformers is
    involved); returns the outputs."""
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            ids = list(prompt)
            for _ in range(n):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
            assert out == ids[len(prompt):]
    return outs


def assert_triton_greedy_equals_torch(path, prompts, n: int, **engine_kw) -> None:
    """Greedy tokens with the Triton backend (the interpreter on the CPU) equal the torch backend's."""
    kw = dict(device="cuda" if torch.cuda.is_available() else "cpu", enforce_eager=True, **engine_kw)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    expected = make_engine(path, attention_backend="torch", **kw).generate(prompts, params)
    assert make_engine(path, attention_backend="triton", **kw).generate(prompts, params) == expected
