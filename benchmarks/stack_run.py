"""The throughput benchmark's stack side: start `tandem serve` (or use a running stack), build text prompts of
chosen token counts, and send many GenerateStream calls at once over the public API.

The public API takes text, not token ids, so prompts are made of whole-word vocabulary tokens (" word") joined
together: byte-level BPE splits text at spaces first and each such word is one token of its own, so a prompt of
k words encodes to about k tokens. The prompts are encoded here with the model's own tokenizer and the ids kept,
so the engine-only run can use exactly the ids the stack's tokenizer will produce.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway.cli.healthcheck import is_serving, open_channel
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc

_WORD = re.compile(r"^ [a-z]{2,12}$")


@dataclass(frozen=True)
class TextPrompt:
    text: str
    token_ids: list[int]   # what encode_text(text) gives: the ids the stack's engine will see


def word_pool(tok) -> list[str]:
    """Vocabulary entries " word" that encode back to exactly their own single token."""
    special = tok.special_token_ids
    words = [tok.decode([i]) for i in range(tok.vocab_size) if i not in special]
    words = sorted({w for w in words if _WORD.match(w)})
    encoded = tok.tokenizer.encode_batch_fast(words, add_special_tokens=False)
    pool = [w for w, e in zip(words, encoded) if len(e.ids) == 1]
    if len(pool) < 100:
        raise RuntimeError(f"the tokenizer has only {len(pool)} single-token words; cannot build prompts")
    return pool


def text_prompts(tok, lengths: list[int], seed: int) -> list[TextPrompt]:
    """One prompt per length, each encoding (special tokens included) to about that many tokens."""
    rng = random.Random(seed)
    pool = word_pool(tok)
    added = len(tok.encode_text(""))  # e.g. a BOS the tokenizer adds to every text
    prompts = []
    for n in lengths:
        text = "".join(rng.choice(pool) for _ in range(max(1, n - added)))
        prompts.append(TextPrompt(text, tok.encode_text(text)))
    return prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalStack:
    """`tandem serve` as a child process (its own process group) on free local ports; output goes to `log`."""

    def __init__(self, model: str, device: str, dtype: str, engine_args: list[str], log: Path,
                 start_timeout_s: float = 300.0, tokenizer: str | None = None) -> None:
        self.model, self.device, self.dtype, self.engine_args = model, device, dtype, engine_args
        self.tokenizer = tokenizer
        self.log, self.start_timeout_s = log, start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.engine_address = ""
        self.http_address = ""

    def __enter__(self) -> "LocalStack":
        gw, tk, en, http = _free_port(), _free_port(), _free_port(), _free_port()
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(gw), "--tokenizer-port", str(tk), "--engine-port", str(en), "--device", self.device,
               "--dtype", self.dtype, "--metrics-port", "0", "--http-port", str(http),
               "--start-timeout", str(self.start_timeout_s),
               *(["--tokenizer-model", self.tokenizer] if self.tokenizer else []), "--", *self.engine_args]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[bench] starting the stack (log: {self.log}): {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.address, self.engine_address = f"127.0.0.1:{gw}", f"127.0.0.1:{en}"
        self.http_address = f"127.0.0.1:{http}"   # the OpenAI-compatible HTTP API
        t0 = time.monotonic()
        # The launcher starts the gateway only after the tokenizer and engine serve, so a serving gateway means
        # the whole stack is up.
        with open_channel(self.address) as ch:
            while not is_serving(ch, 1.0):
                if self.proc.poll() is not None or time.monotonic() - t0 > self.start_timeout_s + 10:
                    self._kill()
                    raise RuntimeError(f"tandem serve did not come up; log tail:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.5)
        print(f"[bench] stack serving at {self.address} after {time.monotonic() - t0:.1f}s", file=sys.stderr,
              flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # the launcher's Ctrl-C path stops all three services in order
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group of the child started above, nothing else
            self.proc.wait()


@dataclass
class StreamResult:
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    error: str = ""


async def _one(stub, text: str, max_tokens: int, result: StreamResult) -> None:
    request = api.GenerateRequest(prompt=text,
                                  params=api.GenerationParams(max_tokens=max_tokens, temperature=0.0))
    try:
        last = None
        async for msg in stub.GenerateStream(request):
            result.output_tokens += len(msg.token_ids)
            last = msg
        if last is None:
            result.error = "empty stream"
            return
        result.prompt_tokens = last.usage.prompt_tokens
        result.finish_reason = api.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_")
        if last.usage.completion_tokens != result.output_tokens:
            result.error = f"usage says {last.usage.completion_tokens} tokens, the stream carried {result.output_tokens}"
    except grpc.RpcError as err:
        result.error = f"{err.code().name}: {err.details()}"


async def _run_all(address: str, prompts: list[TextPrompt], max_tokens: list[int]) -> tuple[list[StreamResult], float]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        # Warm-up: the stack's first request pays for lazy start-up work (connections, first kernels). Its text
        # shares no block with the workload's prompts, so the prefix cache gives them nothing.
        await _one(stub, "Hello, warm-up.", 2, StreamResult())
        results = [StreamResult() for _ in prompts]
        done = 0
        tenth = max(1, len(prompts) // 10)
        t0 = time.perf_counter()

        async def tracked(i: int) -> None:
            nonlocal done
            await _one(stub, prompts[i].text, max_tokens[i], results[i])
            done += 1
            if done % tenth == 0 or done == len(prompts):
                print(f"  stack: {done}/{len(prompts)} requests finished, {time.perf_counter() - t0:.1f}s",
                      file=sys.stderr, flush=True)

        await asyncio.gather(*(tracked(i) for i in range(len(prompts))))
        return results, time.perf_counter() - t0


def run_stack_workload(address: str, prompts: list[TextPrompt], max_tokens: list[int]) -> dict:
    """All requests at once (greedy, max_tokens each); the stack stops a request at EOS, so output counts are
    the tokens actually produced."""
    results, elapsed = asyncio.run(_run_all(address, prompts, max_tokens))
    ok = [r for r in results if not r.error]
    errors = [r.error for r in results if r.error]
    prompt_tok = sum(r.prompt_tokens for r in ok)
    output_tok = sum(r.output_tokens for r in ok)
    reasons: dict[str, int] = {}
    for r in ok:
        reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
    return {"run": "stack", "address": address, "finished": len(ok), "errors": len(errors),
            "first_errors": errors[:5], "finish_reasons": reasons, "prompt_tokens": prompt_tok,
            "output_tokens": output_tok, "seconds": elapsed, "steps": None,
            "output_tok_s": output_tok / elapsed, "total_tok_s": (prompt_tok + output_tok) / elapsed}
