"""The public request's adapter field at the gateway: passed through as given (the engine says whether it is
loaded), and a name too long to ever be loaded is refused before any work."""
from __future__ import annotations

import pytest

from engine_svc.adapters import NAME_PATTERN
from gateway.config import GatewayConfig
from gateway.validation import MAX_ADAPTER_NAME_CHARS, InvalidRequest, validate
from protos.tandem.v1 import generation_pb2 as api


def test_adapter_passes_through_and_defaults_to_the_base_model():
    assert validate(api.GenerateRequest(prompt="hi", adapter="sql-v2"), GatewayConfig(), 100).adapter == "sql-v2"
    assert validate(api.GenerateRequest(prompt="hi"), GatewayConfig(), 100).adapter == ""


def test_a_name_longer_than_any_loadable_one_is_invalid():
    longest = "x" * MAX_ADAPTER_NAME_CHARS
    assert NAME_PATTERN.fullmatch(longest) and not NAME_PATTERN.fullmatch(longest + "x")   # the engine's rule
    with pytest.raises(InvalidRequest, match=f"adapter: longer than {MAX_ADAPTER_NAME_CHARS} characters"):
        validate(api.GenerateRequest(prompt="hi", adapter=longest + "x"), GatewayConfig(), 100)
