"""The session stack's gateway runs without --max-in-flight, so its admission bound is what its one engine queues:
--max-num-seqs 32 + --max-waiting 24 = 56 (tests/e2e/conftest.py). An HTTP call of 57 prompts is refused naming
that bound (the old fixed default, 256, would have let it through), and the gateway logs the bound it took."""
from __future__ import annotations

import openai
import pytest

ENGINE_QUEUE = 32 + 24


def test_the_default_bound_is_the_engines_queue_capacity(stack):
    client = openai.OpenAI(base_url=stack.http_url, api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=["x"] * (ENGINE_QUEUE + 1), max_tokens=1)
    assert f"at most {ENGINE_QUEUE} prompts (the server's max in flight)" in err.value.body["message"]
    assert f"max_in_flight {ENGINE_QUEUE}: the engines' max_num_seqs + max_waiting" in stack.log.read_text()
