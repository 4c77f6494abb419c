"""Structured output in the engine on the real default model (SmolLM2-135M GGUF, CPU): the vocabulary read from the
GGUF, regex, choice and JSON outputs that always match (greedy and sampled, n = 3), the same outputs with
asynchronous scheduling through forced preemptions, a request whose grammar is still compiling that holds back no
one, and one whose grammar does not compile that is rejected alone."""
from __future__ import annotations

import re
import threading

import pytest

from engine_svc.config import EngineConfig
from engine_svc.core.request import FinishReason, SamplingParams, StructuredOutput
from engine_svc.engine import Engine

xgr = pytest.importorskip("xgrammar")

DATE = StructuredOutput("regex", r"\d{4}-\d{2}-\d{2}")
CHOICES = ("positive", "negative", "neutral")
SENTIMENT = StructuredOutput("choice", choices=CHOICES)
ANSWER = StructuredOutput("json_schema", '{"type": "object", "properties": {"answer": {"type": "string", '
                                         '"enum": ["yes", "no"]}, "sure": {"type": "boolean"}}, '
                                         '"required": ["answer", "sure"]}')


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    from tokenizer_svc.loading import load_tokenizer
    return load_tokenizer(str(smollm2_gguf))


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    e = Engine(EngineConfig(model=str(smollm2_gguf), device="cpu", dtype="float32", num_kv_blocks=128,
                            max_model_len=512, async_scheduling=False))
    yield e
    e.shutdown()


def chat(tok, text: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": text}])


def run(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> dict[tuple[int, int], tuple[list, object]]:
    """Runs the jobs together; (job, output index) -> (output ids, finish reason)."""
    base = engine.num_steps
    outs: dict[tuple[int, int], list] = {}
    for i, (prompt, params) in enumerate(jobs):
        engine.add_request(f"job{base}-{i}", prompt, params)
    while engine.has_work():
        if engine.waits_for_grammars():
            engine.structured.wait(timeout=0.1)
        for o in engine.step():
            job = int(o.request_id.rsplit("-", 1)[1])
            entry = outs.setdefault((job, o.index), [[], None])
            entry[0] += o.new_token_ids
            if o.finish_reason is not None:
                entry[1] = o.finish_reason
    return {k: (ids, reason) for k, (ids, reason) in outs.items()}


def test_the_gguf_vocabulary_leaves_control_tokens_out(smollm2_gguf):
    from engine_svc.structured.vocab import tokenizer_info

    info = tokenizer_info(str(smollm2_gguf), 49152, (2,))
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL and info.stop_token_ids == [2]
    assert {0, 1, 3}.issubset(info.special_token_ids) and 2 not in info.special_token_ids   # <|im_start|> ... not text
    assert info.decoded_vocab[29] == b"-" and info.decoded_vocab[30] == b"." and info.decoded_vocab[216] == b" "


def jobs_for(tok) -> list[tuple[list[int], SamplingParams]]:
    date = chat(tok, "When did the first person land on the moon? Answer with the date.")
    mood = chat(tok, "What is the sentiment of: 'I loved this film, it was wonderful'?")
    yes_no = chat(tok, "Is the sky blue? Answer in JSON.")
    return [
        (date, SamplingParams(temperature=0.0, max_tokens=16, structured_output=DATE)),
        (date, SamplingParams(temperature=1.0, seed=7, n=3, best_of=3, max_tokens=16, structured_output=DATE)),
        (mood, SamplingParams(temperature=0.0, max_tokens=8, structured_output=SENTIMENT)),
        (mood, SamplingParams(temperature=1.0, seed=11, n=3, best_of=3, max_tokens=8, structured_output=SENTIMENT)),
        (yes_no, SamplingParams(temperature=1.0, seed=5, max_tokens=24, structured_output=ANSWER)),
        (date, SamplingParams(temperature=0.0, max_tokens=6)),   # free text beside them, unconstrained
    ]


def check_formats(tok, results) -> None:
    import json
    for (job, index), (ids, reason) in results.items():
        text = tok.decode(ids, skip_special_tokens=True)
        if job in (0, 1):
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", text), (job, index, text)
        elif job in (2, 3):
            assert text in CHOICES, (job, index, text)
        elif job == 4:
            value = json.loads(text)
            assert set(value) == {"answer", "sure"} and value["answer"] in ("yes", "no"), text
        if job != 5:
            assert reason is FinishReason.STOP_TOKEN and ids[-1] == 2, (job, index, text)   # ended by the grammar
    assert sorted(results) == [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0), (3, 0), (3, 1), (3, 2), (4, 0), (5, 0)]


def test_outputs_follow_their_format_and_do_not_depend_on_scheduling(engine, tok):
    """The same jobs synchronously, with asynchronous scheduling, and then with a cache so small that requests are
    preempted and recomputed: every output follows its format, and all runs give the same outputs."""
    jobs = jobs_for(tok)
    reference = run(engine, jobs)
    check_formats(tok, reference)
    assert run(engine.with_scheduling(async_scheduling=True), jobs) == reference
    small = engine.with_scheduling(async_scheduling=True, num_kv_blocks=12, enable_prefix_caching=False)
    assert run(small, jobs) == reference
    assert small.scheduler.num_preemptions > 0
    assert not small.structured._grammars and not len(small.structured._matchers)   # nothing kept after the end


def test_a_request_whose_grammar_compiles_holds_back_no_one(engine, tok):
    fresh = engine.with_scheduling(async_scheduling=True)
    gate = threading.Event()
    build = fresh.structured._compilers._make_tokenizer_info
    fresh.structured._compilers._make_tokenizer_info = lambda: gate.wait(60) and build()
    prompt = chat(tok, "When did the first person land on the moon? Answer with the date.")
    fresh.add_request("slow", prompt, SamplingParams(temperature=0.0, max_tokens=16, structured_output=DATE))
    fresh.add_request("free", prompt, SamplingParams(temperature=0.0, max_tokens=4))
    free = []
    while fresh.scheduler.is_live("free"):
        free += [o for o in fresh.step() if o.request_id == "free"]
    assert fresh.scheduler.is_live("slow") and not fresh.scheduler.running and fresh.waits_for_grammars()
    assert sum(len(o.new_token_ids) for o in free) == 4
    gate.set()
    out = []
    while fresh.has_work():
        if fresh.waits_for_grammars():
            fresh.structured.wait(timeout=0.1)
        out += fresh.step()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", tok.decode([t for o in out for t in o.new_token_ids],
                                                        skip_special_tokens=True))


def test_a_grammar_that_does_not_compile_rejects_its_request_only(engine, tok):
    fresh = engine.with_scheduling()
    prompt = chat(tok, "Hello")
    fresh.add_request("bad", prompt, SamplingParams(max_tokens=4, structured_output=StructuredOutput("regex", "(")))
    fresh.add_request("good", prompt, SamplingParams(temperature=0.0, max_tokens=3))
    outs = []
    while fresh.has_work():
        if fresh.waits_for_grammars():
            fresh.structured.wait(timeout=0.1)
        outs += fresh.step()
    bad = [o for o in outs if o.request_id == "bad"]
    assert len(bad) == 1 and bad[0].finish_reason is FinishReason.REJECTED and bad[0].last
    assert bad[0].error.startswith("params.structured_output.regex: ")
    assert sum(len(o.new_token_ids) for o in outs if o.request_id == "good") == 3
