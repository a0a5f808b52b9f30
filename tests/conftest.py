import pytest
import torch

import pyro

# The tests use tiny tensors: intra-op threads only add contention on shared cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    """Every test starts with an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def float64():
    """Run a test in float64 (for comparisons to tight tolerances)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
