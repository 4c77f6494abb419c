"""Grammar compilation off the engine loop's thread, cached by spec.

Compiling a JSON schema or grammar against a vocabulary takes from a millisecond to seconds, so it never runs on
the loop's thread: get() returns a future at once, computed on a small thread pool (xgrammar releases the GIL
while it compiles). Futures are kept in an LRU by spec, failures included, so a spec seen again (the same schema
from many clients, or a bad one resent) is never compiled twice. xgrammar itself (seconds to import), the
vocabulary (TokenizerInfo) and xgrammar's compiler are loaded by the first compilation, on the pool too: an
engine that never sees a structured request never pays for them.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from engine_svc.core.request import StructuredOutput

if TYPE_CHECKING:
    import xgrammar as xgr

COMPILE_THREADS = 2       # concurrent compilations
CACHE_ENTRIES = 256       # specs kept compiled (or known bad)
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")   # xgrammar's "[12:00:00] /path/file.cc:123: " before a reason


class GrammarError(ValueError):
    """The spec does not compile; the message names the public field and says why."""


class GrammarCompilers:
    def __init__(self, make_tokenizer_info: Callable[[], "xgr.TokenizerInfo"],
                 on_done: Callable[[], None] = lambda: None) -> None:
        """make_tokenizer_info: builds the vocabulary (called once, on the pool); on_done: called on a pool thread
        after each compilation ends (wakes the engine loop). The future's exception is a GrammarError when the
        spec is at fault."""
        self._make_tokenizer_info = make_tokenizer_info
        self.on_done = on_done
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[StructuredOutput, Future] = OrderedDict()
        self._compiler: "xgr.GrammarCompiler | None" = None
        self._compiler_lock = threading.Lock()

    def has(self, spec: StructuredOutput) -> bool:
        """spec's compilation is cached (done or under way)."""
        return spec in self._cache

    def get(self, spec: StructuredOutput) -> Future:
        """The compilation of spec: done (from the cache) or under way. Loop thread only."""
        fut = self._cache.get(spec)
        if fut is not None:
            self._cache.move_to_end(spec)
            return fut
        fut = self._pool.submit(self._compile, spec)
        fut.add_done_callback(lambda _: self.on_done())
        self._cache[spec] = fut
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)   # requests that hold the future keep what they need
        return fut

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: StructuredOutput) -> "xgr.CompiledGrammar":
        try:
            compiler = self._get_compiler()
        except ImportError:
            raise GrammarError(f"{spec.field}: structured output needs the xgrammar package, which this engine "
                               f"does not have") from None
        except ValueError as e:   # no vocabulary to compile against
            raise GrammarError(f"{spec.field}: {e}") from None
        try:
            if spec.kind == "json_schema":
                return compiler.compile_json_schema(spec.spec, any_whitespace=False)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.spec)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choices))
            return compiler.compile_grammar(spec.spec)
        except (RuntimeError, ValueError, TypeError) as e:   # xgrammar's parse and conversion errors
            raise GrammarError(f"{spec.field}: {_reason(e)}") from None

    def _get_compiler(self) -> "xgr.GrammarCompiler":
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                # Our LRU caches whole specs; xgrammar's own cache would only hold the same grammars twice.
                self._compiler = xgr.GrammarCompiler(self._make_tokenizer_info(), max_threads=COMPILE_THREADS,
                                                     cache_enabled=False)
            return self._compiler


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar whose language is exactly the choices: JSON string literals are valid GBNF literals."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _reason(e: Exception) -> str:
    text = _CPP_PREFIX.sub("", str(e).strip())
    return " ".join(text.split()) or type(e).__name__
