"""A move of code refreshes the lock without retraining: infra/relock_code_deps.py records the code
deps as they are now and keeps every data dep, param and output the lock holds."""

import subprocess
import sys

import pytest

from .conftest import run


@pytest.mark.e2e
def test_a_code_move_is_recorded_without_retraining_and_a_data_change_is_refused(smoke_workspace):
    work = smoke_workspace
    lock_before = (work / "dvc.lock").read_text()
    objectives = work / "jdm/objectives.py"
    objectives.write_text(objectives.read_text() + "\n# moved code\n")
    status = run(["dvc", "status", "dvc.yaml"], work).stdout  # the smoke build ran the main pipeline only
    assert "warmup:" in status and "extend@hed:" in status and "data:" not in status  # exactly its users

    out = run([sys.executable, "infra/relock_code_deps.py"], work).stdout
    assert "stages refreshed" in out and "refused" not in out
    assert "up to date" in run(["dvc", "status", "dvc.yaml"], work).stdout  # nothing to retrain, outputs as they were
    lock_after = (work / "dvc.lock").read_text()
    assert lock_after != lock_before
    # the lock differs in the hash and size of jdm/objectives.py alone, where its users list it
    assert len(lock_before.splitlines()) == len(lock_after.splitlines())
    changed = [(a.strip(), b.strip()) for a, b in zip(lock_before.splitlines(), lock_after.splitlines()) if a != b]
    assert changed and all(a.split(":")[0] == b.split(":")[0] in ("md5", "size") for a, b in changed), changed
    # ... which is what `dvc commit` writes where the outputs are at hand
    (work / "dvc.lock").write_text(lock_before)
    run(["dvc", "commit", "--force", "dvc.yaml"], work)
    assert (work / "dvc.lock").read_text() == lock_after

    # a stage whose data deps changed is not a move of code: refused, its lock entry kept
    dvc_yaml = (work / "dvc.yaml").read_text()
    (work / "dvc.yaml").write_text(dvc_yaml.replace("      - data/prepared\n    params:\n      - seed\n      - teacher\n",
                                                    "    params:\n      - seed\n      - teacher\n", 1))
    refused = subprocess.run([sys.executable, "infra/relock_code_deps.py"], cwd=work, capture_output=True, text=True)
    assert refused.returncode == 1 and "refused: teacher: data deps changed" in refused.stdout
