"""Runs the planned calls of `tandem bench soak` at a fixed concurrency and records how each one ended. A call that
has not ended `hang_after_s` after its start (its deadline plus `deadline_slack_s` when it has one) is a hang:
it is cancelled and recorded as HUNG."""
from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field

import grpc

from benchmarks.request_fuzz import check_response, multi_callable, outputs_of
from benchmarks.soak_workload import INTEGRITY_PROMPTS, PlannedCall, integrity_request
from protos.tandem.v1 import generation_pb2 as api

HUNG = "HUNG"


@dataclass
class Outcome:
    index: int
    kind: str
    method: str
    status: str = ""                   # the final gRPC status name, or HUNG
    details: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    output_tokens: int = 0
    seconds: float = 0.0
    unexpected_status: bool = False    # ended with a status that is wrong for this call (a hang included)
    wrong_answer: bool = False         # answered OK, but the answer breaks the API's promises
    integrity_checked: bool = False    # a greedy repeat answered OK, compared with its warm-up output
    integrity_mismatch: bool = False   # ... and its tokens or text differ from it
    problems: list[str] = field(default_factory=list)   # what is wrong, in words; the soak fails when any
    request: str = ""                  # the request's text form (shortened), or the raw bytes


@dataclass(frozen=True)
class Limits:
    concurrency: int
    hang_after_s: float        # a call without a deadline that has not ended by then is a hang
    deadline_slack_s: float    # a call with a deadline: the deadline plus this


async def _consume(call, method: str) -> list:
    if method == "Generate":
        return [await call]
    return [m async for m in call]


async def run_call(channel, planned: PlannedCall, limits: Limits, vocab_size: int,
                   expected_outputs: dict[str, tuple[list[int], str]]) -> Outcome:
    out = Outcome(planned.index, planned.kind, planned.method,
                  request=str(planned.request)[:2000] if planned.request is not None else repr(planned.payload[:200]))
    watchdog = (planned.timeout_s + limits.deadline_slack_s) if planned.timeout_s is not None else limits.hang_after_s
    start = time.perf_counter()
    call = multi_callable(channel, planned.method)(planned.payload, timeout=planned.timeout_s)
    task = asyncio.ensure_future(_consume(call, planned.method))
    timer = None
    if planned.cancel_after_s is not None:
        timer = asyncio.get_running_loop().call_later(planned.cancel_after_s, call.cancel)
    done, _ = await asyncio.wait({task}, timeout=watchdog)
    out.seconds = time.perf_counter() - start
    if timer is not None:
        timer.cancel()
    if not done:
        call.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        out.status, out.unexpected_status = HUNG, True
        out.problems.append(f"did not end within {watchdog:g} s")
        return out
    try:
        messages = task.result()
        out.status = grpc.StatusCode.OK.name
    except asyncio.CancelledError:      # the client cancel of a `cancel` call
        out.status = grpc.StatusCode.CANCELLED.name
    except grpc.aio.AioRpcError as err:
        out.status, out.details = err.code().name, (err.details() or "")[:300]
    if out.status not in {code.name for code in planned.expected}:
        out.unexpected_status = True
        out.problems.append(f"status {out.status} ({out.details}) is not one of "
                            f"{sorted(code.name for code in planned.expected)}")
    if out.status == grpc.StatusCode.OK.name:
        _check_answer(out, planned, messages, vocab_size, expected_outputs)
    return out


def _check_answer(out: Outcome, planned: PlannedCall, messages: list, vocab_size: int,
                  expected_outputs: dict[str, tuple[list[int], str]]) -> None:
    outputs = outputs_of(planned.method, messages)
    out.finish_reasons = [api.FinishReason.Name(f).removeprefix("FINISH_REASON_") for _, _, f in outputs.values()]
    out.output_tokens = sum(len(ids) for ids, _, _ in outputs.values())
    wrong = check_response(planned.method, planned.request, messages, vocab_size)
    out.wrong_answer = bool(wrong)
    out.problems += wrong
    if planned.integrity_prompt:
        out.integrity_checked = True
        want_ids, want_text = expected_outputs[planned.integrity_prompt]
        for index, (ids, text, _) in sorted(outputs.items()):
            if ids != want_ids or text != want_text:
                out.integrity_mismatch = True
                out.problems.append(f"integrity: output {index} of {planned.integrity_prompt!r} is {ids} {text!r}, "
                                    f"alone it was {want_ids} {want_text!r}")


def warm_up(address: str, max_tokens: int) -> dict[str, tuple[list[int], str]]:
    """Each integrity prompt alone: the output every greedy repeat of it must return."""
    expected = {}
    with grpc.insecure_channel(address) as channel:
        for prompt in INTEGRITY_PROMPTS:
            resp = multi_callable(channel, "Generate")(integrity_request(prompt, max_tokens).SerializeToString(),
                                                       timeout=300)
            expected[prompt] = (list(resp.token_ids), resp.text)
    return expected


async def run_soak(address: str, calls: list[PlannedCall], limits: Limits, vocab_size: int,
                   expected_outputs: dict[str, tuple[list[int], str]], progress: bool) -> tuple[list[Outcome], float]:
    slots = asyncio.Semaphore(limits.concurrency)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(calls), desc="soak", unit="req", file=sys.stderr, dynamic_ncols=True)
    failed = 0
    # Enough room for every call's messages, whatever max_request_bytes the fuzzer tries.
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        start = time.perf_counter()

        async def one(planned: PlannedCall) -> Outcome:
            nonlocal failed
            async with slots:
                out = await run_call(channel, planned, limits, vocab_size, expected_outputs)
            if bar is not None:
                failed += bool(out.problems)
                bar.set_postfix(failed=failed, refresh=False)
                bar.update(1)
            return out

        outcomes = await asyncio.gather(*(one(c) for c in calls))
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(outcomes), duration
