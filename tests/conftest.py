import pytest
import torch

# The suite runs under pytest-xdist with one worker per core; more than one torch thread per worker oversubscribes
# the cores and makes tiny ops stall. Tests that need threads set them locally.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
