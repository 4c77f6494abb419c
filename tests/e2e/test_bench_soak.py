"""`tandem bench soak` against the session stack, small: every call accounted for, none hung, the checks pass, the
JSON and the exit code say so, and the stack's three processes have their memory reported."""
from __future__ import annotations

import json
import os

from benchmarks import process_rss, soak


def _stack_pids(stack) -> list[int]:
    """The tokenizer, engine and gateway processes of the session's `tandem serve` (a child of this process)."""
    port = stack.address.rsplit(":", 1)[1]
    for pid in process_rss.children(os.getpid()):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if b"serve" in argv and port.encode() in argv:
            return process_rss.children(pid)
    raise AssertionError("the session stack's tandem serve process was not found")


def test_small_soak_passes(stack, tmp_path, capsys):
    out = tmp_path / "soak.json"
    code = soak.main(["--address", stack.address, "--engine-address", stack.engine_address,
                      "--pids", *map(str, _stack_pids(stack)), "--num-requests", "24", "--concurrency", "8",
                      "--max-tokens", "4", "--long-max-tokens", "8", "--seed", "13", "--no-progress",
                      "--json", str(out)])
    result = json.loads(out.read_text())
    summary, checks = result["summary"], result["summary"]["checks"]
    assert code == 0 and summary["passed"], summary
    requests = result["requests"]
    assert [r["index"] for r in requests] == list(range(24))
    assert sum(summary["status"].values()) == 24 and "HUNG" not in summary["status"]
    assert all(r["status"] and not r["problems"] for r in requests)
    assert checks["hung"] == checks["unexpected_status"] == checks["wrong_answer"] == 0
    assert checks["integrity_checked"] > 0 and checks["integrity_mismatch"] == 0
    assert checks["kv_blocks_used_idle"] == 0 and checks["kv_integrity_failures"] == 0
    assert checks["kv_integrity_checks"] >= 1   # the session stack runs with --check-kv-integrity
    assert sorted(m["name"] for m in result["processes"]) == ["engine_svc", "gateway", "tokenizer_svc"]
    assert all(m["before"] > 0 and m["after"] > 0 for m in result["processes"]) and not checks["processes_exited"]
    # The OK outputs' finish reasons are counted, and the table shows every check.
    assert sum(summary["finish_reasons"].values()) >= summary["status"].get("OK", 0)
    table = capsys.readouterr().out
    assert "PASSED" in table and "KV blocks used once idle" in table and "hung" in table


def test_a_hang_a_leak_or_a_crash_fails_the_soak():
    """A call that did not end, a KV block held once idle, or a stack process that exited fails the soak (and so
    its exit code)."""
    hung = soak.Outcome(0, "plain", "Generate", status=soak.HUNG, unexpected_status=True, problems=["did not end"])
    fine = soak.Outcome(1, "plain", "Generate", status="OK", finish_reasons=["LENGTH"])
    summary = soak.summarize([hung, fine], None, None, True, [])
    assert not summary["passed"] and summary["checks"]["hung"] == 1
    assert summary["failures"] == ["1 calls did not end"]
    assert soak.summarize([fine], None, None, True, [])["passed"]
    leak = soak.epb.EngineLoad(kv_blocks_used=3, kv_integrity_checks=2)
    summary = soak.summarize([fine], soak.epb.EngineLoad(kv_integrity_checks=1), leak, True, [])
    assert not summary["passed"] and summary["checks"]["kv_blocks_used_idle"] == 3, summary
    # A service that died (and was restarted under a new pid) fails it too.
    died = [{"name": "engine_svc", "pid": 10, "before": 900.0, "after": None},
            {"name": "engine_svc", "pid": 11, "before": None, "after": 800.0}]
    summary = soak.summarize([fine], None, None, True, died)
    assert summary["failures"] == ["stack processes exited during the run: engine_svc 10"]
