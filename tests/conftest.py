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


@pytest.fixture(autouse=True)
def _tracking_uri_stays_the_tests_own():
    """A test that records in-process calls `mlflow.set_tracking_uri`, which also sets MLFLOW_TRACKING_URI
    for child processes: left there, every later test's stages (and what they start) would record into that
    test's temporary store (CI: a killed stage's run went to another test's database). Put back after each."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        import mlflow
        mlflow.set_tracking_uri(before)  # None unsets both MLflow's global URI and the variable
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def smoke_params():
    from jdm.profiles import profile_params
    return profile_params("smoke", REPO)
