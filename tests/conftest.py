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
    from jdm.config import load_params
    return load_params(REPO / "profiles" / "smoke.yaml")


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path where a test can write a user's plugin module."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("user_conditions")]:
        del sys.modules[name]
