"""The engine's contract conversion: every sampling field reaches SamplingParams, and bad values are refused."""
from __future__ import annotations

import pytest

from engine_svc.service.proto_convert import params_from_pb
from protos.tandem.internal.v1 import engine_pb2 as pb


def test_every_sampling_field_is_converted():
    p = params_from_pb(pb.SamplingParams(
        temperature=0.5, top_p=0.9, top_k=5, seed=3, max_tokens=7, stop_token_ids=[4], ignore_eos=True, min_p=0.1,
        repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={9: 2.0, 3: -1.0},
        allowed_token_ids=[1, 2], min_tokens=2), vocab_size=10)
    assert (p.temperature, p.top_k, p.seed, p.max_tokens, p.ignore_eos, p.min_tokens) == (0.5, 5, 3, 7, True, 2)
    assert p.stop_token_ids == frozenset({4}) and p.logit_bias == ((3, -1.0), (9, 2.0))
    assert p.allowed_token_ids == frozenset({1, 2}) and p.uses_penalties
    assert p.min_p == pytest.approx(0.1) and p.repetition_penalty == pytest.approx(1.2)


def test_unset_fields_mean_off():
    p = params_from_pb(pb.SamplingParams(top_p=1.0, max_tokens=1), vocab_size=10)
    assert p.repetition_penalty == 1.0 and not p.uses_penalties
    assert p.allowed_token_ids is None and p.logit_bias == () and p.min_p == 0.0 and p.min_tokens == 0


@pytest.mark.parametrize("field,value,message", [
    ("logit_bias", {12: 1.0}, "logit_bias: token ids [12]"),
    ("allowed_token_ids", [3, 11], "allowed_token_ids: token ids [11]"),
    ("min_p", 1.5, "min_p must be in [0, 1]"),
    ("repetition_penalty", float("nan"), "repetition_penalty must be > 0"),
])
def test_bad_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        params_from_pb(pb.SamplingParams(top_p=1.0, max_tokens=1, **{field: value}), vocab_size=10)
