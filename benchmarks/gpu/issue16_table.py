"""One table of the issue-16 measurements in a directory that benchmarks/gpu/issue16.py filled: every target beside
its figure and the same-run baseline it is a ratio to, as markdown. A step that did not run, failed or timed out
shows as not measured, with why.

    python -m benchmarks.gpu.issue16_table bench_out/issue16
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

QUANT_METHODS = ("bf16", "int8", "int4", "int4_shuffled", "fp8")


class Results:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        status_file = directory / "steps.json"
        self.steps = json.loads(status_file.read_text()) if status_file.exists() else {}

    def get(self, step: str) -> dict | None:
        path = self.dir / f"{step}.json"
        return json.loads(path.read_text()) if path.exists() and self.steps.get(step, {}).get("status") == "ok" \
            else None

    def why_not(self, step: str) -> str:
        s = self.steps.get(step)
        if s is None:
            return "not measured (not run)"
        detail = s.get("why") or (f"exit {s['rc']}, see {step}.log" if s.get("rc") is not None else f"{step}.log")
        return f"not measured ({s['status']}: {detail})"


def _ratio_row(name: str, value: float | None, unit: str, base: float | None, base_name: str, target: float,
               why: str) -> list[str]:
    if value is None:
        return [name, why, "", f">= {target:g}x {base_name}", ""]
    if base is None:
        return [name, f"{value:,.1f} {unit}", f"no {base_name} figure", f">= {target:g}x {base_name}", ""]
    ratio = value / base
    return [name, f"{value:,.1f} {unit}", f"{ratio:.2f}x {base_name}", f">= {target:g}x {base_name}",
            "yes" if ratio >= target else "no"]


def _base(result: dict | None) -> str:
    """The unquantized run's name in the rows: its dtype (bf16 on the GPU)."""
    dtype = (result or {}).get("dtype", "bfloat16")
    return "bf16" if dtype == "bfloat16" else dtype


def decode_rows(r: Results) -> list[list[str]]:
    copy = r.get("copy_bandwidth")
    bandwidth = copy["gb_s"] * 1e9 if copy else None
    rows = [["copy bandwidth (read + write)", f"{copy['gb_s']:,.0f} GB/s" if copy else r.why_not("copy_bandwidth"),
             "", "", ""]]
    decode = {q: r.get(f"decode_{q}") for q in QUANT_METHODS}
    tok_s = {q: d["decode"]["decode_tok_s_median"] if d else None for q, d in decode.items()}
    first = next((d for d in decode.values() if d), None)
    model, base = first["model"] if first else "llama3-8b", _base(decode["bf16"])
    line = [f"{model} batch-1 decode, {base}", r.why_not("decode_bf16"), "", ">= 85% of the roofline", ""]
    if decode["bf16"] is not None:
        line[1:3] = [f"{tok_s['bf16']:,.1f} tok/s", "no copy bandwidth figure"]
        if bandwidth is not None:
            roofline = bandwidth / decode["bf16"]["weight_bytes_per_token"]
            share = tok_s["bf16"] / roofline
            line[2:] = [f"{share:.0%} of {roofline:,.0f} tok/s roofline", ">= 85% of the roofline",
                        "yes" if share >= 0.85 else "no"]
    rows.append(line)
    for q, target in (("int8", 1.6), ("int4", 2.0), ("int4_shuffled", 2.0), ("fp8", 1.6)):
        weights = "int4 weights, GEMV over the shuffled layout" if q == "int4_shuffled" else f"{q} weights"
        row = _ratio_row(f"{model} batch-1 decode, {weights}", tok_s[q], "tok/s", tok_s["bf16"], base, target,
                         r.why_not(f"decode_{q}"))
        if decode[q] is not None and bandwidth is not None:
            row[2] += f" ({tok_s[q] / (bandwidth / decode[q]['weight_bytes_per_token']):.0%} of its roofline)"
        if q == "int4_shuffled" and tok_s[q] and tok_s["int4"]:
            row[2] += f"; {tok_s[q] / tok_s['int4']:.2f}x the plain int4 layout"
        rows.append(row)
    rows.append(smollm2_row(r))
    return rows


def smollm2_row(r: Results) -> list[str]:
    """Tandem's SmolLM2 batch-1 decode over the same run's anchor: the same shapes decoded by gpt-fast's method,
    written here (benchmarks/compiled_decode_reference.py), since the GPU host has no gpt-fast."""
    smol, ref = r.get("decode_smollm2"), r.get("reference_smollm2")
    name = f"{smol['model'] if smol else 'smollm2-135m'} batch-1 decode, {_base(smol)}"
    anchor = "compiled static-cache decode (gpt-fast's method, benchmarks/compiled_decode_reference.py)"
    target = ">= 1.3x the anchor"
    if smol is None:
        return [name, r.why_not("decode_smollm2"), f"anchor: {anchor}", target, ""]
    tok_s = smol["decode"]["decode_tok_s_median"]
    if ref is None:
        return [name, f"{tok_s:,.1f} tok/s", f"anchor {r.why_not('reference_smollm2')}: {anchor}", target, ""]
    base = ref["decode"]["decode_tok_s_median"]
    return [name, f"{tok_s:,.1f} tok/s", f"{tok_s / base:.2f}x the anchor's {base:,.1f} tok/s: {anchor}", target,
            "yes" if tok_s / base >= 1.3 else "no"]


def throughput_rows(r: Results) -> list[list[str]]:
    runs = {name: r.get(f"throughput_{name}") for name in ("bf16", "fp8", "bf16_fp8kv", "fp8_fp8kv")}
    tok_s = {name: next((x["output_tok_s"] for x in res["runs"] if x["run"] == "engine"), None) if res else None
             for name, res in runs.items()}
    first = next((res for res in runs.values() if res), None)
    model = first["runs"][0]["model"] if first else "llama3-8b"
    base = _base(runs["bf16"]["runs"][0] if runs["bf16"] else None)
    w = first["workload"] if first else {"num_requests": 1024, "input_len": [128], "output_len": [128]}
    rows = [[f"{model}, {w['num_requests']:,} x {w['input_len'][0]}/{w['output_len'][0]}, {base}",
             f"{tok_s['bf16']:,.0f} output tok/s" if tok_s["bf16"] else r.why_not("throughput_bf16"), "",
             "baseline", ""]]
    rows.append(_ratio_row("the same, fp8 weights", tok_s["fp8"], "output tok/s", tok_s["bf16"], base, 1.5,
                           r.why_not("throughput_fp8")))
    rows.append(_ratio_row(f"the same, {base} + fp8 KV cache", tok_s["bf16_fp8kv"], "output tok/s", tok_s["bf16"],
                           base, 1.0, r.why_not("throughput_bf16_fp8kv")))
    rows.append(_ratio_row("the same, fp8 weights + fp8 KV cache", tok_s["fp8_fp8kv"], "output tok/s",
                           tok_s["fp8"], "fp8", 1.0, r.why_not("throughput_fp8_fp8kv")))
    both = runs["bf16"]
    if both is not None:
        stack = next((x for x in both["runs"] if x["run"] == "stack"), None)
        ratio, unequal = both.get("stack_vs_engine_output_tok_s"), both.get("unequal_work")
        value = "no stack run" if stack is None else (
            f"{stack['output_tok_s']:,.0f} output tok/s, {stack['finished']} finished, {stack['errors']} errors")
        against = f"{ratio:.3f}x engine" if ratio is not None else f"not comparable ({unequal})"
        rows.append([f"the {base} workload through the whole stack", value, against, "every request served",
                     "yes" if stack and not stack["errors"] and ratio is not None else "no"])
    return rows


def sampling_rows(r: Results) -> list[list[str]]:
    s = r.get("sampling")
    if s is None:
        return [["sampling, decode batch 64", r.why_not("sampling"), "", "", ""]]
    by_name = {row["sampling"]: row for row in s["rows"]}
    rows = []
    for name, target in (("temperature + top_p", 0.03), ("full sampling set", 0.08)):
        row = by_name.get(name)
        if row is None:
            continue
        rows.append([f"sampling, {name}, batch {row['batch']}",
                     f"{row['sampling_ms']:.2f} ms on a {row['forward_ms']:.2f} ms forward",
                     f"{row['sampling_share']:.1%} of the step", f"<= {target:.0%} of the step",
                     "yes" if row["sampling_share"] <= target else "no"])
    return rows


def quant_rows(r: Results) -> list[list[str]]:
    q = r.get("quant_matmul")
    if q is None:
        return [["quantized linears, M = 1", r.why_not("quant_matmul"), "", "", ""]]
    one = [row for row in q["rows"] if row["m"] == min(x["m"] for x in q["rows"])]
    total = {m: sum(row[m]["us"] for row in one) if all(row.get(m) for row in one) else None for m in QUANT_METHODS}
    parts = [f"{m} {total[m]:,.1f} us ({total['bf16'] / total[m]:.2f}x)" for m in QUANT_METHODS if total[m]]
    return [[f"quantized linears, M = {one[0]['m']}, one decoder layer's shapes", "; ".join(parts),
             "speed-up over bf16", "", ""]]


def rope_kv_write_rows(r: Results) -> list[list[str]]:
    """Per cache dtype: the fused RoPE + KV write against the two kernels it replaces, per layer call."""
    result = r.get("rope_kv_write")
    if result is None:
        return [["RoPE + KV write per layer call, fused vs the pair", r.why_not("rope_kv_write"), "", "", ""]]
    rows = []
    for cache in dict.fromkeys(row["cache"] for row in result["rows"]):
        runs = [row for row in result["rows"] if row["cache"] == cache]
        shape = f"{runs[0]['heads']}/{runs[0]['kv_heads']} heads of {runs[0]['head_dim']}"
        rows.append([f"RoPE + KV write per layer call ({shape}), {cache} cache",
                     "; ".join(f"batch {x['batch']}: {x['fused_us']:.2f} us fused, {x['pair_us']:.2f} us pair"
                               for x in runs),
                     ", ".join(f"{x['pair_us'] / x['fused_us']:.2f}x" for x in runs) + " the pair's speed",
                     "faster than the pair", "yes" if all(x["fused_us"] < x["pair_us"] for x in runs) else "no"])
    return rows


def gpu_test_rows(r: Results) -> list[list[str]]:
    s = r.steps.get("gpu_tests")
    value = r.why_not("gpu_tests") if s is None or s["status"] != "ok" else "passed"
    return [["bf16 / fp8 / quantized kernel tests on the GPU", value, "", "pass", "yes" if value == "passed" else ""]]


def table(directory: Path) -> str:
    r = Results(directory)
    rows = (decode_rows(r) + throughput_rows(r) + sampling_rows(r) + quant_rows(r) + rope_kv_write_rows(r)
            + gpu_test_rows(r))
    header = ["measurement", "value", "against the same run", "target", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m benchmarks.gpu.issue16_table DIRECTORY")
    text = table(Path(argv[0]))
    print(f"\nissue 16 measurements in {argv[0]} (random weights at the real shapes)\n{text}")
    return text


if __name__ == "__main__":
    main()
