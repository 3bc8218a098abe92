import random
import sys

import pytest



@pytest.fixture(autouse=True)
def _global_rng():
    """Every test starts from the same global RNG state (torch, numpy, random), whatever ran before it:
    a test that draws from the global generators without seeding them draws the same numbers in any order."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path where a test can write a user's plugin module."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("user_conditions")]:
        del sys.modules[name]
