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
# torch threads of the tests and of every stage they start (params `threads: 0` takes OMP_NUM_THREADS): two,
# never more, and one under pytest-xdist (`make test` runs two workers on two cores), whose workers would
# otherwise oversubscribe the cores (OpenMP threads waiting on a busy core cost 4-40x here)
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)
os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(autouse=True)
def _threads():
    import torch
    torch.set_num_threads(THREADS)


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


def write_image_folder(root, n=12, sizes=((20, 24), (40, 30)), held_out=0, labels=True):
    """A user's folder for data.source imagefolder: `n` captioned RGB images of two classes (PNG and JPEG,
    two sizes), metadata.jsonl beside them (with a label column unless `labels` is False: diffusers'
    training examples' layout); the last `held_out` in a test/ subfolder (datasets' split layout)."""
    import json

    import numpy as np
    from PIL import Image

    rows = {"train": [], "test": []}
    for i in range(n):
        split = "test" if i >= n - held_out else "train"
        folder = root / split if held_out else root
        folder.mkdir(parents=True, exist_ok=True)
        h, w = sizes[i % len(sizes)]
        pixels = np.full((h, w, 3), 30, np.uint8)  # a gray ground, a red (cat) or blue (dog) square somewhere
        y, x = i % (h // 2), 3 * i % (w // 2)
        pixels[y:y + h // 2, x:x + w // 2, i % 2 * 2] = 220
        name = f"im{i}.{'png' if i % 3 else 'jpg'}"
        Image.fromarray(pixels).save(folder / name)
        kind = "cat" if i % 2 == 0 else "dog"
        rows[split].append({"file_name": name, "text": f"a {kind}, number {i % 4}", **({"label": kind} if labels else {})})
    for split, lines in rows.items():
        if lines:
            (root / split if held_out else root).joinpath("metadata.jsonl").write_text(
                "\n".join(json.dumps(r) for r in lines) + "\n")
    return root
