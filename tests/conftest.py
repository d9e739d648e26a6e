import os
import sys

import pytest
import torch

# test helper modules (tests/_routing_methods_ref.py, ...) import by name from tests in subfolders
sys.path.insert(0, os.path.dirname(__file__))

# The suite runs under pytest-xdist with one worker per core; more than one torch thread per worker oversubscribes
# the cores and makes tiny ops stall. Tests that need threads set them locally.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
