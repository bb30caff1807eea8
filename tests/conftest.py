import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny():
    """A fresh tiny random Llama (4 blocks, d=64) with the embedded tokenizer."""
    from nla_core.testing import tiny_handle

    return tiny_handle("llama")


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M-Instruct), loaded once per session. Tests that
    add adapters to it must remove them (or use `embedded_fresh`)."""
    from nla_core import load_model

    return load_model()


def pytest_collection_modifyitems(config, items):
    has_key = bool(os.environ.get("ANTHROPIC_API_KEY"))
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "api" in item.keywords and not has_key:
            item.add_marker(pytest.mark.skip(reason="needs ANTHROPIC_API_KEY"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
