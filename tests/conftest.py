"""What both halves of the suite share: the offline switches, the repository root, two torch threads,
the smoke profile's params.
tests/unit/conftest.py and tests/e2e/conftest.py hold what only one half uses."""

import os
import sys
from pathlib import Path

import pytest

from jdm.env import set_offline_env

set_offline_env()
# the `jdm` and `dvc` the tests start are this interpreter's, even when the venv is not activated
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _threads():
    # tests run one at a time; two cores for torch, never more (oversubscription costs 4-40x here)
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def smoke_params():
    from jdm.profiles import profile_params
    return profile_params("smoke", REPO)
