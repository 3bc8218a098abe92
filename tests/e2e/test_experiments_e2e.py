"""`dvc exp run -S`: DVC's way to try a setting. A `--temp` experiment runs in a copy under
`.dvc/tmp/exps/`; its MLflow run must still land in the workspace's store, and the workspace's
params.yaml stays as it was. The add-control flow's `steps` goes through the same record."""

import json
import subprocess
import sys

import pytest
import yaml

from ..conftest import REPO
from .conftest import run


def extend_steps(node) -> set:
    """Every `extend.steps` value in `dvc exp show --json` (workspace, commits and their experiments)."""
    found = set()
    if isinstance(node, dict):
        params = node.get("params", {}).get("params.yaml", {}).get("data", {})
        if isinstance(params.get("extend"), dict):
            found.add(params["extend"].get("steps"))
        for value in node.values():
            found |= extend_steps(value)
    elif isinstance(node, list):
        for value in node:
            found |= extend_steps(value)
    return found


@pytest.mark.e2e
def test_a_temporary_dvc_experiment_records_into_the_workspace_store(smoke_workspace):
    import mlflow

    work = smoke_workspace
    git = ["git", "-c", "user.name=jdm-tests", "-c", "user.email=tests@jdm.invalid"]
    run([*git, "add", "-A"], work)
    run([*git, "commit", "-qm", "the smoke workspace"], work)  # an experiment is relative to a commit
    params_before = (work / "params.yaml").read_text()
    run(["dvc", "exp", "run", "--temp", "-n", "sr-three-steps", "-S", "extend.steps=3", "extend@sr"], work)
    assert (work / "params.yaml").read_text() == params_before
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=work, capture_output=True, text=True,
                                      check=True).stdout)
    text = json.dumps(shown)
    assert "sr-three-steps" in text
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("jdm").experiment_id],
                              "tags.stage = 'extend' and tags.condition = 'sr' and params.`extend.steps` = '3'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert not list((work / ".dvc/tmp/exps").rglob("mlflow.db"))  # nothing recorded into the temporary copy
    assert yaml.safe_load(params_before)["extend"]["steps"] != 3

    # the flow's `steps` override: a DVC experiment in the workspace, registered from its run
    from prefect.testing.utilities import prefect_test_harness

    sys.path.insert(0, str(REPO / "flows"))
    from jdm_flows import add_control

    with prefect_test_harness():
        registered = add_control(condition="sr", steps=2, workspace=str(work))
    assert (work / "params.yaml").read_text() == params_before
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=work, capture_output=True, text=True,
                                      check=True).stdout)
    assert 2 in extend_steps(shown), json.dumps(shown)[:3000]  # besides the workspace's and HEAD's own
    name, version = registered.split("/")
    model_run = client.get_run(client.get_model_version(name, version).run_id)
    assert model_run.data.params["extend.steps"] == "2" and model_run.data.tags["stage"] == "extend"
    assert json.loads((work / "metrics/extend-sr.json").read_text())["steps"] == 2
    assert "extend@sr" in run(["dvc", "status", "extend@sr"], work).stdout  # off the team's params.yaml now
