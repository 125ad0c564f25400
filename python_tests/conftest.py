import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_precision_guard():
    """The precision guard warns once per call site; every test starts with none warned."""
    from fdsm_ext import precision

    precision._calls.clear()
    yield
