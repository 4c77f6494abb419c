"""Every service logs one format: time, level and service on each text line; one object per json line."""
from __future__ import annotations

import json
import logging
import re

import pytest

from protos.service_logging import JsonFormatter, TextFormatter, check_logging, setup_logging


def _record(message: str, level: int = logging.INFO, **extra) -> logging.LogRecord:
    record = logging.LogRecord("tandem.engine.loader", level, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    return record


def test_text_lines_carry_time_level_and_service():
    line = TextFormatter("engine").format(_record("loaded LlamaForCausalLM (gguf) in 0.4s", logging.WARNING))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARNING engine: loaded LlamaForCausalLM \(gguf\) "
                        r"in 0\.4s", line), line


def test_json_lines_carry_level_service_and_logger():
    out = json.loads(JsonFormatter("tokenizer").format(_record("listening on 127.0.0.1:5")))
    assert {k: out[k] for k in ("level", "service", "logger", "message")} == {
        "level": "info", "service": "tokenizer", "logger": "tandem.engine.loader", "message": "listening on 127.0.0.1:5"}


def test_structured_events_render_their_fields():
    record = _record("ignored", fields={"event": "finish", "request_id": "r1", "tokens": 3})
    assert TextFormatter("gateway").format(record).endswith(" INFO gateway: finish request_id=r1 tokens=3")
    assert json.loads(JsonFormatter("gateway").format(record))["request_id"] == "r1"


@pytest.fixture
def restored_root_logger():
    """setup_logging configures the process's `tandem` logger; the tests after this one keep pytest's."""
    root = logging.getLogger("tandem")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved


def test_level_filters_and_bad_values_are_refused(capfd, restored_root_logger):
    setup_logging("engine", "warning", "text")
    logging.getLogger("tandem.engine.x").info("quiet")
    logging.getLogger("tandem.engine.x").warning("loud")
    err = capfd.readouterr().err
    assert "loud" in err and "quiet" not in err
    with pytest.raises(ValueError, match="log_level"):
        check_logging("verbose", "text")
    with pytest.raises(ValueError, match="log_format"):
        check_logging("info", "xml")
