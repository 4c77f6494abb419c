"""`tandem bench serve` against a running stack, over gRPC and over the OpenAI-compatible HTTP API: every request
accounted for, token counts equal to what was asked (greedy, ignore_eos), the timings consistent with each other,
and its pictures written."""
from __future__ import annotations

import json

import pytest

from benchmarks import serve_load

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("api", ["grpc", "openai"])
def test_load_run_over_a_dataset(stack, tmp_path, capsys, api):
    dataset = tmp_path / "prompts.jsonl"
    asked = [3, 5, 4, 2, 5, 3]
    dataset.write_text("\n".join(json.dumps({"prompt": f"Tell me about the number {i}.", "max_tokens": n})
                                 for i, n in enumerate(asked)) + "\n")
    out = tmp_path / "serve.json"
    address = stack.http_url if api == "openai" else stack.address
    serve_load.main(["--api", api, "--address", address, "--dataset", str(dataset), "--concurrency", "2",
                     "--request-rate", "50", "--no-progress", "--out-dir", str(tmp_path / "png"),
                     "--json", str(out)])
    result = json.loads(out.read_text())
    s = result["summary"]
    assert (s["requests"], s["completed"], s["errors"]) == (6, 6, 0)
    reqs = result["requests"]
    assert [r["output_tokens"] for r in reqs] == asked
    assert all(r["finish_reason"] == "LENGTH" and r["prompt_tokens"] > 0 for r in reqs)
    assert s["output_tokens"] == sum(asked) and s["prompt_tokens"] == sum(r["prompt_tokens"] for r in reqs)
    # One ITL per token after the first; TTFT and E2E one per request.
    assert s["itl_s"]["count"] == sum(n - 1 for n in asked)
    assert s["ttft_s"]["count"] == s["e2e_s"]["count"] == 6
    for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        d = s[key]
        assert 0 <= d["p50"] <= d["p90"] <= d["p99"]
    assert s["ttft_s"]["p99"] <= s["e2e_s"]["p99"]
    assert s["output_tok_s"] * s["duration_s"] == pytest.approx(sum(asked))
    for path in result["plots"]:
        assert open(path, "rb").read(8) == PNG
    table = capsys.readouterr().out
    assert "TTFT" in table and "ITL" in table and "p99 ms" in table
