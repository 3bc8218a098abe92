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
    from jdm.config import profile_params
    return profile_params("smoke", REPO)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path where a test can write a user's plugin module."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("user_conditions")]:
        del sys.modules[name]


def workspace_copy(dst):
    """The repository as a clean clone would have it (tracked and untracked-but-not-ignored files)."""
    sys.path.insert(0, str(REPO / "infra"))
    from workspace import clean_copy
    return clean_copy(dst)


def run(cmd, cwd, timeout=600, env=None):
    import subprocess
    env = env or {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory):
    """One smoke `dvc repro` in a temporary copy, shared by the end-to-end tests (pipeline first,
    then services: they run in file order and each leaves the workspace consistent)."""
    work = workspace_copy(tmp_path_factory.mktemp("e2e") / "repo")
    run(["jdm", "profile", "smoke"], work)
    run(["dvc", "repro"], work)
    return work


def params_file(work, name, **sections):
    """A variant of the workspace's params.yaml (sections updated, or top-level keys replaced)."""
    import yaml
    raw = yaml.safe_load((work / "params.yaml").read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    (work / name).write_text(yaml.safe_dump(raw))
    return name
