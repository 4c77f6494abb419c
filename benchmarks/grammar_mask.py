"""What a structured-output mask costs next to the decode step it follows: one decode batch (64 sequences by
default) timed as the model forward, then sampling without a grammar, then sampling with every row constrained by
a grammar, each row at its own point of its output (a random walk of 0..47 tokens through the grammar, so rows
sit in keys, strings, numbers and enums). The grammar's own share is split into filling the bitmask on the host
(xgrammar, all rows in one batched call) and applying it on the device (one kernel for the batch); advancing each
row's matcher by its new token is timed on its own; their sum is the grammar's cost per step, shown as a share
of the step (forward + unconstrained sampling). Sampling with the grammar is timed whole too, as a check. Prints a
table and writes JSON.

    tandem bench grammar                                   # SmolLM2 on this machine's device
    tandem bench grammar --model llama3-8b --device cuda   # random weights at the real shapes; the vocabulary
                                                           # for the grammar comes from --vocab (default: SmolLM2)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import replace

import torch

from benchmarks.model_arg import describe, engine_config, sync
from benchmarks.report import write_json
from benchmarks.sampling_overhead import decode_batch, parse_batch_args, timed
from engine_svc.core.request import Request, SamplingParams, StructuredOutput
from engine_svc.core.scheduler import ScheduledRequest
from engine_svc.engine import Engine
from engine_svc.sampling.logits_processors import apply_token_bitmask
from engine_svc.sampling.sampler import to_device
from engine_svc.structured.manager import StructuredOutputs, model_vocabulary
from engine_svc.worker.model_runner import LaunchedStep

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                         "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "role", "tags", "address"],
}
GRAMMARS = {
    "json schema": StructuredOutput("json_schema", json.dumps(RECORD)),
    "json object": StructuredOutput("json_object"),
    "regex (date)": StructuredOutput("regex", r"\d{4}-\d{2}-\d{2}"),
}


def walk(grammar, vocab_size: int, steps: int, seed: int) -> list[int]:
    """A random path of up to `steps` tokens that the grammar allows, never ending it."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammar)
    stops = set(matcher.stop_token_ids)
    bits = xgr.allocate_token_bitmask(1, vocab_size)
    rng, tokens = random.Random(seed), []
    for _ in range(steps):
        matcher.fill_next_token_bitmask(bits)
        allowed = [t for t in allowed_ids(bits, vocab_size) if t not in stops]
        if not allowed:
            break
        token = allowed[rng.randrange(len(allowed))]
        matcher.accept_token(token)
        tokens.append(token)
    return tokens


def allowed_ids(bits: torch.Tensor, vocab_size: int) -> list[int]:
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits[0][:, None] >> shifts) & 1).flatten()[:vocab_size].nonzero().flatten().tolist()


def constrained_rows(structured: StructuredOutputs, spec: StructuredOutput,
                     sampling: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """The step's sampling rows, each standing for a request at its own point of spec's output."""
    grammar = structured.compiled(spec)
    rows = []
    for i, s in enumerate(sampling):
        req = Request(f"g{i}", [1], replace(s.request.params, structured_output=spec, ignore_eos=False), arrival=i)
        req.token_ids += walk(grammar, structured.vocab_size, i % 48, seed=i)
        structured.start(req.request_id, spec)   # compiled already: ready at once
        rows.append(ScheduledRequest(req, 1, req.num_tokens - 1, True))
    return rows


def time_advance(grammar, rows: list[ScheduledRequest], vocab_size: int, repeats: int) -> float:
    """Median ms to advance a matcher per row by one token (each accepts a token it allows, then rolls back)."""
    import xgrammar as xgr

    matchers, nexts = [], []
    bits = xgr.allocate_token_bitmask(1, vocab_size)
    for s in rows:
        m = xgr.GrammarMatcher(grammar)
        for t in s.request.output_token_ids:
            m.accept_token(t)
        m.fill_next_token_bitmask(bits)
        matchers.append(m)
        nexts.append(allowed_ids(bits, vocab_size)[0])
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m, token in zip(matchers, nexts):
            m.accept_token(token)
        ms.append((time.perf_counter() - t0) * 1e3)
        for m in matchers:
            m.rollback(1)
    return statistics.median(ms)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", default=None, help="a GGUF or HF directory whose vocabulary the grammars are compiled "
                                                 "against (default: the model's; SmolLM2's for random weights)")
    args = parse_batch_args(p, argv, 64, 10, "bench_out/grammar_mask.json")
    vocab_path = args.vocab or (args.model if args.load_format != "dummy" else None)
    if vocab_path is None:
        from gateway.cli.model_fetch import fetch_default_model
        vocab_path = str(fetch_default_model())
    engine = Engine(engine_config(args, enforce_eager=True, async_scheduling=False))
    header = describe(engine)
    print(header, file=sys.stderr, flush=True)
    runner, cfg = engine.runner, engine.model_cfg
    plain = SamplingParams(temperature=1.0, seed=0, max_tokens=1 << 20, ignore_eos=True)
    out = decode_batch(engine.with_scheduling(), [plain] * args.batch, args.prompt_len)
    sampling = [s for s in out.scheduled if s.samples]
    logits = runner.forward_logits(out)
    forward_ms = timed(engine, lambda: runner.forward_logits(out), args.repeats)
    runner.structured = None
    plain_ms = timed(engine, lambda: runner.sample_rows(logits.clone(), sampling, LaunchedStep(None)), args.repeats)
    rows = [{"grammar": "none", "batch": args.batch, "forward_ms": forward_ms, "sampling_ms": plain_ms,
             "fill_ms": 0.0, "apply_ms": 0.0, "advance_ms": 0.0}]
    for name, spec in GRAMMARS.items():
        structured = StructuredOutputs(model_vocabulary(vocab_path, cfg.vocab_size, tuple(cfg.eos_token_ids)),
                                       cfg.vocab_size, args.batch)
        constrained = constrained_rows(structured, spec, sampling)
        requests = [s.request for s in constrained]
        runner.structured = structured
        sample_ms = timed(engine, lambda: runner.sample_rows(logits.clone(), constrained, LaunchedStep(None)),
                          args.repeats)
        runner.structured = None
        fill_ms = timed(engine, lambda: structured.bitmask(requests), args.repeats)
        bits, filled = structured.bitmask(requests)
        dev_bits = to_device(bits, torch.int32, runner.device)
        dev_rows = to_device(filled, torch.int32, runner.device)
        apply_ms = timed(engine, lambda: apply_token_bitmask(logits.clone(), dev_bits, dev_rows), args.repeats)
        clone_ms = timed(engine, lambda: logits.clone(), args.repeats)
        advance_ms = time_advance(structured.compiled(spec), constrained, cfg.vocab_size, args.repeats)
        structured.shutdown()
        rows.append({"grammar": name, "batch": args.batch, "forward_ms": forward_ms, "sampling_ms": sample_ms,
                     "fill_ms": fill_ms, "apply_ms": max(apply_ms - clone_ms, 0.0), "advance_ms": advance_ms})
        print(f"  {name}: sampling {sample_ms:.2f} ms (fill {fill_ms:.2f}, apply {apply_ms - clone_ms:.2f}), "
              f"advance {advance_ms:.2f}", file=sys.stderr, flush=True)
    sync(engine)
    step_ms = forward_ms + plain_ms
    print(f"\n{header}\ndecode step of {args.batch} sequences, every row constrained; median of {args.repeats}. "
          f"Step = forward {forward_ms:.2f} ms + unconstrained sampling {plain_ms:.2f} ms = {step_ms:.2f} ms; "
          f"grammar = mask fill + mask apply + advance")
    print(f"{'grammar':>14} {'mask fill ms':>13} {'mask apply ms':>14} {'advance ms':>11} {'grammar ms':>11} "
          f"{'share of step':>14} {'sampling with it ms':>20}")
    for r in rows[1:]:
        r["grammar_ms"] = r["fill_ms"] + r["apply_ms"] + r["advance_ms"]
        r["grammar_share"] = r["grammar_ms"] / (step_ms + r["grammar_ms"])
        print(f"{r['grammar']:>14} {r['fill_ms']:>13.2f} {r['apply_ms']:>14.2f} {r['advance_ms']:>11.2f} "
              f"{r['grammar_ms']:>11.2f} {100 * r['grammar_share']:>13.1f}% {r['sampling_ms']:>20.2f}")
    result = {"benchmark": "grammar_mask", "model": engine.model_name, "vocab": vocab_path,
              "device": str(runner.device), "dtype": str(runner.dtype).split(".")[-1], "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
