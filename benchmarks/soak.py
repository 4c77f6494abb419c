"""Soak test of the public gRPC API (`tandem bench soak`): many calls at a fixed concurrency, a seeded mix of plain
requests, client cancels, short deadlines, n/best_of, beam search, stop strings, greedy repeats of fixed prompts
and fuzzed requests (benchmarks/soak_workload.py), then checks that one call never harmed another or the server.

    tandem bench soak                                    # starts a stack here (with --check-kv-integrity)
    tandem bench soak --num-requests 300 --concurrency 8 --device cpu --dtype float32
    tandem bench soak --address HOST:PORT --engine-address HOST:PORT [--pids PID ...]

Prints the final gRPC status of the calls by kind, the finish reasons of the OK outputs, and the checks:
- every call ended (with an answer or an error) within its deadline plus --deadline-slack, or --hang-after
  seconds without a deadline; a call that did not is a hang;
- every call ended with a status that is right for it (e.g. OK or RESOURCE_EXHAUSTED for a well-formed request,
  INVALID_ARGUMENT for bytes that are not a request), and every OK answer keeps the API's promises (n outputs,
  each finished, token ids in the vocabulary, at most max_tokens, no stop string in the text, usage);
- every greedy repeat returned its prompt's warm-up output, and so do the prompts alone after the run (a token
  of another request would change it);
- the engine holds no KV block once idle, and its KV integrity checks (GetLoad's kv_integrity_failures; the
  engine's --check-kv-integrity) found nothing during the run;
- no process of the stack exited (a service the launcher restarted shows as a new pid), and the resident memory
  of the gateway, tokenizer and engine before and after (known when the stack is started here, else from
  --pids).
Writes a JSON of every call's outcome; exits 1 when any check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import grpc

from benchmarks import process_rss
from benchmarks.report import write_json
from benchmarks.serve_stats import distribution
from benchmarks.soak_run import HUNG, Limits, Outcome, run_soak, warm_up
from benchmarks.soak_workload import KINDS, SoakWorkload
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc

INTEGRITY_FLAG = "--check-kv-integrity"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="a running gateway HOST:PORT; without it a stack is started here")
    p.add_argument("--engine-address", help="the running stack's engine HOST:PORT (for the KV checks)")
    p.add_argument("--pids", type=int, nargs="+", default=[],
                   help="processes of the running stack whose resident memory is reported")
    p.add_argument("--model", default="default", help="model of the stack started here")
    p.add_argument("--device", default="auto", help="device of the stack started here")
    p.add_argument("--dtype", default="auto", help="dtype of the stack started here")
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", nargs="+", default=[], metavar="KIND=WEIGHT",
                   help=f"change the weight of kinds of calls, e.g. fuzz=0 beam=2 (default: "
                        f"{' '.join(f'{k}={v:g}' for k, v in KINDS.items())})")
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of every call but cancels and deadlines")
    p.add_argument("--long-max-tokens", type=int, default=32, help="max_tokens of the calls cancelled or cut short")
    p.add_argument("--hang-after", type=float, default=180.0,
                   help="seconds after which a call without a deadline that has not ended is a hang (on a loaded "
                        "2-core CPU, calls at concurrency 16 take up to a minute)")
    p.add_argument("--deadline-slack", type=float, default=10.0,
                   help="seconds past its deadline after which a call that has not ended is a hang")
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="seconds to wait after the run for the engine to go idle")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--stack-log", type=Path, default=Path("bench_out/soak_stack.log"))
    p.add_argument("--json", type=Path, default=Path("bench_out/soak.json"))
    p.add_argument("engine_args", nargs="*", help=f"after --: engine arguments for the stack started here "
                                                  f"({INTEGRITY_FLAG} is added)")
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.concurrency < 1 or not 1 <= args.max_tokens <= args.long_max_tokens:
        p.error("need --num-requests >= 1, --concurrency >= 1, 1 <= --max-tokens <= --long-max-tokens")
    args.weights = dict(KINDS)
    for item in args.mix:
        kind, _, weight = item.partition("=")
        if kind not in KINDS:
            p.error(f"--mix: unknown kind {kind!r} in {item!r} (KIND=WEIGHT)")
        try:
            args.weights[kind] = float(weight)
        except ValueError:
            p.error(f"--mix: {item!r} is not KIND=WEIGHT")
    if any(w < 0 for w in args.weights.values()) or not sum(args.weights.values()) > 0:
        p.error("--mix: weights must be >= 0, and not all 0")
    if args.address is None:
        from gateway.cli.model_fetch import resolve_model
        args.model = str(resolve_model(args.model))
    return args


# --- the engine's side --------------------------------------------------------------------------------------------

def engine_load(engine_address: str) -> epb.EngineLoad | None:
    try:
        with grpc.insecure_channel(engine_address) as ch:
            return engine_pb2_grpc.EngineStub(ch).GetLoad(epb.EngineLoadRequest(), timeout=10)
    except grpc.RpcError:
        return None


def wait_idle(engine_address: str, timeout_s: float, checks_before: int) -> epb.EngineLoad | None:
    """The engine's load once nothing runs, waits or holds a KV block, and (when it checks its KV integrity) once
    it has run a check after the load; the last answer when `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = engine_load(engine_address)
        idle = load is not None and load.num_running == load.num_waiting == load.kv_blocks_used == 0
        checked = load is not None and (checks_before == 0 or load.kv_integrity_checks > checks_before)
        if (idle and checked) or time.monotonic() > deadline:
            return load
        time.sleep(0.1)


def memory(pids: list[int]) -> dict[int, tuple[str, float | None]]:
    """pid -> (process name, RSS in MiB or None when it is gone)."""
    return {pid: (process_rss.name(pid), process_rss.rss_mib(pid)) for pid in pids}


def process_rows(before: dict[int, tuple[str, float | None]], after: dict[int, tuple[str, float | None]]
                 ) -> list[dict]:
    """One row per stack process seen before or after the run (a restarted service shows as a new pid)."""
    rows = []
    for pid in sorted(before.keys() | after.keys()):
        name = before[pid][0] if pid in before else after[pid][0]
        rows.append({"name": name, "pid": pid, "before": before.get(pid, (name, None))[1],
                     "after": after.get(pid, (name, None))[1]})
    return rows


# --- the run ------------------------------------------------------------------------------------------------------

def soak(args: argparse.Namespace, address: str, engine_address: str | None, processes: Callable[[], list[int]]
         ) -> dict:
    """The run against a serving stack; `processes` lists the stack's processes at the time of the call."""
    with grpc.insecure_channel(address) as ch:
        vocab_size = generation_pb2_grpc.GenerationStub(ch).GetModelInfo(api.GetModelInfoRequest(),
                                                                          timeout=30).vocab_size
    calls = SoakWorkload(vocab_size, args.max_tokens, args.long_max_tokens).plan(args.num_requests, args.seed,
                                                                                  args.weights)
    expected = warm_up(address, args.max_tokens)
    before = wait_idle(engine_address, args.idle_timeout, 0) if engine_address else None
    rss_before = memory(processes())
    limits = Limits(args.concurrency, args.hang_after, args.deadline_slack)
    outcomes, duration = asyncio.run(run_soak(address, calls, limits, vocab_size, expected, args.progress))
    after = None
    if engine_address:
        after = wait_idle(engine_address, args.idle_timeout, before.kv_integrity_checks if before else 0)
    try:
        still_same = warm_up(address, args.max_tokens) == expected
    except grpc.RpcError as err:
        print(f"[soak] the fixed prompts failed after the run: {err.code().name} {err.details()}", file=sys.stderr)
        still_same = False
    rss_after = memory(sorted(set(processes()) | rss_before.keys()))
    rows = process_rows(rss_before, rss_after)
    return {"benchmark": "soak", "address": address, "engine_address": engine_address, "seed": args.seed,
            "num_requests": args.num_requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "long_max_tokens": args.long_max_tokens, "mix": args.weights, "duration_s": duration,
            "vocab_size": vocab_size,
            "summary": summarize(outcomes, before, after, still_same, rows),
            "processes": rows,
            "warmup_outputs": {p: {"token_ids": ids, "text": text} for p, (ids, text) in expected.items()},
            "requests": [asdict(o) for o in outcomes]}


def summarize(outcomes: list[Outcome], before: epb.EngineLoad | None, after: epb.EngineLoad | None,
              still_same: bool, processes: list[dict]) -> dict:
    by_kind: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    for o in outcomes:
        by_kind[o.kind][o.status] += 1
    finish = Counter(r for o in outcomes for r in o.finish_reasons)
    checks = {
        "hung": sum(o.status == HUNG for o in outcomes),
        "unexpected_status": sum(o.unexpected_status and o.status != HUNG for o in outcomes),
        "wrong_answer": sum(o.wrong_answer for o in outcomes),
        "integrity_checked": sum(o.integrity_checked for o in outcomes),
        "integrity_mismatch": sum(o.integrity_mismatch for o in outcomes),
        "alone_after_run_as_before": still_same,
        "processes_exited": [f"{p['name']} {p['pid']}" for p in processes
                             if p["before"] is not None and p["after"] is None],
        "kv_blocks_used_idle": None if after is None else after.kv_blocks_used,
        "engine_idle": None if after is None else after.num_running == after.num_waiting == 0,
        "ok_seconds": _spread([o.seconds for o in outcomes if o.status == "OK"]),
        "engine_steps": None if after is None or before is None else after.steps - before.steps,
        "engine_restarted": None if after is None or before is None else after.steps < before.steps,
        "kv_integrity_checks": None if after is None or before is None
        else after.kv_integrity_checks - before.kv_integrity_checks,
        "kv_integrity_failures": None if after is None or before is None
        else after.kv_integrity_failures - before.kv_integrity_failures,
    }
    failures = []
    if checks["hung"]:
        failures.append(f"{checks['hung']} calls did not end")
    if checks["unexpected_status"]:
        failures.append(f"{checks['unexpected_status']} calls ended with a wrong status")
    if checks["wrong_answer"]:
        failures.append(f"{checks['wrong_answer']} OK answers break the API's promises")
    if checks["integrity_mismatch"]:
        failures.append(f"{checks['integrity_mismatch']} greedy repeats differ from their warm-up output")
    if checks["processes_exited"]:
        failures.append(f"stack processes exited during the run: {', '.join(checks['processes_exited'])}")
    if not still_same:
        failures.append("after the run the fixed prompts alone no longer give their warm-up output")
    if after is None and before is not None:
        failures.append("the engine stopped answering GetLoad")
    if checks["engine_restarted"]:
        failures.append("the engine restarted during the run (its step count went back)")
    if after is not None:
        if after.kv_blocks_used or not checks["engine_idle"]:
            failures.append(f"the engine is not idle with every KV block free: {after.num_running} running, "
                            f"{after.num_waiting} waiting, {after.kv_blocks_used} KV blocks used")
        if checks["kv_integrity_failures"] and not checks["engine_restarted"]:
            failures.append(f"{checks['kv_integrity_failures']} KV integrity checks failed (see the engine's log)")
    return {"status_by_kind": {k: dict(c) for k, c in by_kind.items()},
            "status": dict(sum(by_kind.values(), Counter())), "finish_reasons": dict(finish), "checks": checks,
            "failures": failures, "passed": not failures,
            "first_problems": [f"#{o.index} {o.kind}: {'; '.join(o.problems)[:400]}\n    {o.request[:300]!r}"
                               for o in outcomes if o.problems][:10]}


def format_table(result: dict) -> str:
    s, c = result["summary"], result["summary"]["checks"]
    statuses = sorted(s["status"], key=lambda name: (name != "OK", name == HUNG, name))
    lines = [f"tandem bench soak: {result['num_requests']} calls to {result['address']}, concurrency "
             f"{result['concurrency']}, seed {result['seed']}, {result['duration_s']:.1f} s",
             "",
             "final status by kind",
             f"{'kind':<10} {'calls':>6} " + " ".join(f"{name:>6}" for name in statuses)]
    rows = [*s["status_by_kind"].items(), ("all", s["status"])]
    for kind, counts in rows:
        lines.append(f"{kind:<10} {sum(counts.values()):>6} " + " ".join(f"{counts.get(name, 0):>{max(6, len(name))}}"
                                                                        for name in statuses))
    ok = c["ok_seconds"]
    lines += ["", "finish reasons of the OK outputs: " + (", ".join(f"{k} {v}" for k, v in
                                                                   sorted(s["finish_reasons"].items())) or "none"),
              "seconds per OK call: " + (f"p50 {ok['p50']:.1f}, p99 {ok['p99']:.1f}, max {ok['max']:.1f}" if ok
                                         else "none") + (f"; engine steps during the run: {c['engine_steps']}"
                                                         if c["engine_steps"] is not None else ""),
              "", f"{'check':<52} {'value':>12}  result"]

    def row(label: str, value, ok: bool | None) -> None:
        lines.append(f"{label:<52} {value!s:>12}  {'-' if ok is None else 'pass' if ok else 'FAIL'}")

    row("calls that did not end (hung)", c["hung"], c["hung"] == 0)
    row("calls ending with a wrong status", c["unexpected_status"], c["unexpected_status"] == 0)
    row("OK answers breaking the API's promises", c["wrong_answer"], c["wrong_answer"] == 0)
    row("greedy repeats unlike their warm-up output", f"{c['integrity_mismatch']} / {c['integrity_checked']}",
        c["integrity_mismatch"] == 0)
    row("fixed prompts alone after the run as before", "yes" if c["alone_after_run_as_before"] else "no",
        c["alone_after_run_as_before"])
    known = c["kv_blocks_used_idle"] is not None
    row("KV blocks used once idle", c["kv_blocks_used_idle"] if known else "unknown",
        (c["kv_blocks_used_idle"] == 0 and c["engine_idle"]) if known else None)
    checks_ran = c["kv_integrity_checks"]
    row("KV integrity failures (checks run)",
        f"{c['kv_integrity_failures']} ({checks_ran})" if checks_ran is not None else "unknown",
        (c["kv_integrity_failures"] == 0) if checks_ran else None)
    exited = c["processes_exited"]
    row("stack processes that exited during the run", len(exited) if result["processes"] else "unknown",
        not exited if result["processes"] else None)
    if result["processes"]:
        lines += ["", f"{'process':<14} {'pid':>8} {'RSS before MiB':>15} {'after MiB':>10} {'change':>8}"]
        for m in result["processes"]:
            b, a = m["before"], m["after"]
            change = f"{a - b:+.1f}" if a is not None and b is not None else "-"
            lines.append(f"{m['name']:<14} {m['pid']:>8} {_mib(b):>15} {_mib(a):>10} {change:>8}")
    lines += ["", "PASSED" if s["passed"] else "FAILED: " + "; ".join(s["failures"])]
    if s["first_problems"]:
        lines += ["first problems:", *s["first_problems"]]
    return "\n".join(lines)


def _spread(values: list[float]) -> dict | None:
    return {**distribution(values), "max": max(values)} if values else None


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.address:
        result = soak(args, args.address, args.engine_address, lambda: args.pids)
    else:
        from benchmarks.stack_run import LocalStack
        engine_args = args.engine_args + ([INTEGRITY_FLAG] if INTEGRITY_FLAG not in args.engine_args else [])
        with LocalStack(args.model, args.device, args.dtype, engine_args, args.stack_log,
                        args.start_timeout) as stack:
            result = soak(args, stack.address, stack.engine_address, lambda: process_rss.children(stack.proc.pid))
    print("\n" + format_table(result))
    write_json(args.json, result)
    return 0 if result["summary"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
