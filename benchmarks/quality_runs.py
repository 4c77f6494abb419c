"""What `tandem eval` runs on one engine: the text's negative log-likelihood through prompt_logprobs, greedy
continuations, and the check that the engine really runs the precision it was asked for."""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from benchmarks.quality_modes import Mode
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine

# One window is one request: the prompt's logprobs score the window, and its single output token is discarded.
_SCORE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)


def window_nll(engine: Engine, windows: list[list[int]], max_in_flight: int,
               on_window: Callable[[int, int], None] = lambda done, total: None) -> tuple[float, int]:
    """(summed NLL, tokens predicted) over the windows, each scored as the prompt of its own request. At most
    max_in_flight windows are in the engine at once: enough to fill a step's token budget, while the KV cache
    needs room for only that many and any number of windows stays within the engine's queue bound."""
    pending = deque(enumerate(windows))
    live: set[str] = set()
    nll, count, done = 0.0, 0, 0
    while pending or engine.has_work():
        while pending and len(live) < max_in_flight:
            i, window = pending.popleft()
            rid = f"ppl-{i}"
            engine.add_request(rid, window, _SCORE)
            live.add(rid)
        for out in engine.step():
            if out.prompt_logprobs is not None:
                window = windows[int(out.request_id.split("-")[1])]
                if [e.token_id for e in out.prompt_logprobs] != window[1:]:
                    raise RuntimeError(f"{out.request_id}: prompt logprobs do not cover the window's tokens")
                nll -= sum(e.logprob for e in out.prompt_logprobs)
                count += len(out.prompt_logprobs)
            if out.last:
                live.discard(out.request_id)
                done += 1
                on_window(done, len(windows))
    expected = sum(len(w) - 1 for w in windows)
    if count != expected:
        raise RuntimeError(f"scored {count} tokens, expected {expected}")
    return nll, count


def greedy_outputs(engine: Engine, prompts: list[list[int]], gen_len: int) -> list[list[int]]:
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True))
    short = [i for i, o in enumerate(outputs) if len(o) != gen_len]
    if short:
        raise RuntimeError(f"prompts {short} produced fewer than {gen_len} tokens (context too short?)")
    return outputs


_QUANTIZED_DTYPES = {"int8": (torch.int8,), "int4": (torch.uint8,),
                     "fp8": tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))}
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2") if hasattr(torch, n))


def precision_problem(engine: Engine, mode: Mode) -> str | None:
    """Why the loaded engine does not run `mode` (None when it does). An engine that accepts a setting but ignores
    it would otherwise report the unquantized model's figures under the quantized mode's name."""
    runner = engine.runner
    if mode.dtype != "auto" and str(runner.dtype) != f"torch.{mode.dtype}":
        return f"asked for dtype {mode.dtype}, the engine runs {runner.dtype}"
    if mode.quantization != "none":
        stored = {t.dtype for t in (*runner.model.parameters(), *runner.model.buffers())}
        if not stored & set(_QUANTIZED_DTYPES[mode.quantization]):
            return (f"asked for {mode.quantization} weights, but the loaded model holds none "
                    f"(dtypes {sorted(str(d) for d in stored)}): this engine does not apply --quantization")
    if mode.kv_cache_dtype == "fp8" and _kv_cache_dtype(runner) not in _FP8:
        return f"asked for an fp8 KV cache, the engine's is {_kv_cache_dtype(runner)}"
    return None


def _kv_cache_dtype(runner):
    # A runner with an fp8 KV cache names its cache dtype (its caches hold data and scales); before that, the
    # caches are plain tensors in the model dtype.
    return getattr(runner, "kv_cache_dtype", None) or runner.kv_caches[0].dtype
