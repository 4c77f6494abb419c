"""The engine's side of structured output: compilations for the scheduler, masks for the sampler.

The scheduler stays plain Python: it only asks is_ready(request), which is false while the request's grammar
compiles, so that request waits in its place while the others run. The engine asks take_errors() for requests
whose grammar failed to compile (rejected) or whose output broke it (failed), and the driver's sampler asks
bitmask() for the constrained rows of each step it samples.
"""
from __future__ import annotations

from concurrent import futures
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable, Container

from engine_svc.core.request import Request, StructuredOutput
from engine_svc.structured.compiler import GrammarCompilers, GrammarError

if TYPE_CHECKING:
    import torch
    import xgrammar as xgr

    from engine_svc.structured.matchers import GrammarMatchers


def model_vocabulary(model_path: str, vocab_size: int,
                     eos_token_ids: tuple[int, ...]) -> Callable[[], "xgr.TokenizerInfo"]:
    """The model's vocabulary, read when first called (on the compile pool: it imports xgrammar)."""
    def build() -> "xgr.TokenizerInfo":
        from engine_svc.structured.vocab import tokenizer_info
        return tokenizer_info(model_path, vocab_size, eos_token_ids)
    return build


class StructuredOutputs:
    def __init__(self, vocabulary: Callable[[], "xgr.TokenizerInfo"], vocab_size: int, max_rows: int) -> None:
        """vocabulary: builds the grammar engine's view of the vocabulary (model_vocabulary); vocab_size: the
        logits' width; max_rows: the usual largest batch (the mask grows past it when needed)."""
        self.vocab_size = vocab_size
        self.max_rows = max_rows
        self.wake: Callable[[], None] = lambda: None   # the engine loop's: a compilation has ended
        self._compilers = GrammarCompilers(vocabulary, on_done=lambda: self.wake())
        self._grammars: dict[str, Future] = {}         # API request id -> its compilation, while the request lives
        # Of those, the ones not yet seen compiled by take_errors(): only that call, on the loop's thread, makes a
        # request ready, so a compilation ending mid-step never changes what the step sees.
        self._unchecked: set[str] = set()
        self._broken: dict[str, str] = {}              # API request id -> how its output broke the grammar
        self._matchers: GrammarMatchers | None = None  # made with the first mask, once xgrammar is loaded

    def start(self, request_id: str, spec: StructuredOutput) -> None:
        """Starts (or finds in the cache) the compilation of a new API request's grammar. Raises GrammarError when
        an earlier request already found that the spec does not compile; a compilation this call starts reports
        through take_errors() even when it fails at once (deterministically, whatever the compile threads' pace)."""
        known = self._compilers.has(spec)
        fut = self._compilers.get(spec)
        if known and fut.done() and isinstance(fut.exception(), GrammarError):
            raise fut.exception()
        self._grammars[request_id] = fut
        if not (fut.done() and fut.exception() is None):
            self._unchecked.add(request_id)

    def compiled(self, spec: StructuredOutput) -> "xgr.CompiledGrammar":
        """spec compiled, waiting for it if need be (benchmarks and tests; the engine never blocks on one)."""
        return self._compilers.get(spec).result()

    def is_ready(self, req: Request) -> bool:
        return req.params.structured_output is None or req.external_id not in self._unchecked

    def waits_for(self, waiting: list[Request]) -> bool:
        """Every waiting request waits for a grammar still compiling: a step could do nothing for them."""
        return bool(waiting) and all(r.external_id in self._unchecked and not self._grammars[r.external_id].done()
                                     for r in waiting)

    def wait(self, timeout: float) -> None:
        """Blocks until a pending compilation ends, or timeout (offline use; the engine loop waits on its inbox)."""
        pending = [self._grammars[rid] for rid in self._unchecked]
        if pending:
            futures.wait(pending, timeout, return_when=futures.FIRST_COMPLETED)

    def take_errors(self) -> tuple[list[tuple[str, BaseException]], list[tuple[str, str]]]:
        """(API request id, compile error) of the requests whose grammar failed, and (API request id, reason) of
        those whose output broke their grammar, since the last call. The others whose grammar has compiled are
        ready from now on."""
        failed = []
        for rid in [rid for rid in self._unchecked if self._grammars[rid].done()]:
            self._unchecked.discard(rid)
            if self._grammars[rid].exception() is not None:
                failed.append((rid, self._grammars[rid].exception()))
        broken, self._broken = list(self._broken.items()), {}
        return failed, broken

    def forget(self, is_live: Callable[[str], bool], members: Container[str]) -> None:
        """Drops the state of requests that ended: is_live(API request id), members: the live member ids."""
        for rid in [rid for rid in self._grammars if not is_live(rid)]:
            del self._grammars[rid]
            self._unchecked.discard(rid)
        if self._matchers is not None and len(self._matchers):
            self._matchers.forget_finished(members)

    def bitmask(self, requests: list[Request]) -> "tuple[torch.Tensor, list[int]] | None":
        """The host bitmask of a step's sampling rows (requests, in row order) and the rows it constrains; None
        when no row is constrained. Every constrained request is ready (the scheduler only runs those)."""
        rows = [(i, r, self._grammars[r.external_id].result())
                for i, r in enumerate(requests) if r.params.structured_output is not None]
        if not rows:
            return None
        if self._matchers is None:
            from engine_svc.structured.matchers import GrammarMatchers
            self._matchers = GrammarMatchers(self.vocab_size, self.max_rows)
        bits, filled, broken = self._matchers.fill(rows)
        self._broken.update(broken)
        return (bits, filled) if filled else None

    def shutdown(self) -> None:
        self._compilers.shutdown()
