"""Per-request timings of a load run and their summary: TTFT, ITL, TPOT and E2E at p50/p90/p99, throughput."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request as the client saw it; times are perf_counter seconds."""
    prompt_chars: int
    max_tokens: int
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)   # arrival of each message that carried tokens
    chunk_tokens: list[int] = field(default_factory=list)    # tokens in that message
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.sent

    def itls(self) -> list[float]:
        """The gap before each token after the first. A message carrying k tokens (several engine steps merged on
        the way) spreads its gap over its k tokens, so the ITLs of a request sum to e2e - ttft."""
        out: list[float] = []
        for i in range(1, len(self.chunk_times)):
            k = self.chunk_tokens[i]
            out.extend([(self.chunk_times[i] - self.chunk_times[i - 1]) / k] * k)
        if self.chunk_tokens and self.chunk_tokens[0] > 1:    # tokens after the first within the first message
            out.extend([0.0] * (self.chunk_tokens[0] - 1))
        return out


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    rank = (len(s) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def distribution(values: list[float]) -> dict[str, float]:
    out = {"mean": sum(values) / len(values) if values else math.nan, "count": len(values)}
    out.update({f"p{p}": percentile(values, p) for p in PERCENTILES})
    return out


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    ok = [r for r in records if r.ok]
    prompt_tok = sum(r.prompt_tokens for r in ok)
    output_tok = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "requests": len(records), "completed": len(ok), "errors": len(records) - len(ok),
        "first_errors": [r.error for r in records if r.error][:5],
        "duration_s": duration_s, "prompt_tokens": prompt_tok, "output_tokens": output_tok,
        "request_throughput": len(ok) / duration_s, "output_tok_s": output_tok / duration_s,
        "total_tok_s": (prompt_tok + output_tok) / duration_s,
        "ttft_s": distribution([r.ttft for r in ok]),
        "itl_s": distribution([x for r in ok for x in r.itls()]),
        "tpot_s": distribution(tpot),
        "e2e_s": distribution([r.e2e for r in ok]),
    }


def format_table(summary: dict, title: str) -> str:
    lines = [title,
             f"requests {summary['completed']}/{summary['requests']} completed ({summary['errors']} errors) in "
             f"{summary['duration_s']:.2f} s: {summary['request_throughput']:.2f} req/s, "
             f"{summary['output_tok_s']:.1f} output tok/s, {summary['total_tok_s']:.1f} total tok/s",
             f"{'metric':>8} {'mean ms':>10} " + " ".join(f"{f'p{p} ms':>10}" for p in PERCENTILES)]
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        d = summary[key]
        lines.append(f"{label:>8} {d['mean'] * 1e3:>10.1f} "
                     + " ".join(f"{d[f'p{p}'] * 1e3:>10.1f}" for p in PERCENTILES))
    return "\n".join(lines)
