from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF), fetched on first use."""
    from gateway.cli.model_fetch import fetch_default_model

    return fetch_default_model(quiet=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip cleanly without CUDA (torch imported only when such a test was collected: the gateway
    and tokenizer tests never need it)."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu:
        item.add_marker(skip)
