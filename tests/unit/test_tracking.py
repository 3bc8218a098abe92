"""MLflow runs left `RUNNING` by a killed stage are marked failed by the next stage on the same host;
runs of other hosts and of live processes are left alone; a flow run's id and the data a stage read
reach its run."""

import os
import subprocess
import sys

from jdm.tracking import FLOW_RUN_ENV, folder_digest, stage_run

KILLED_STAGE = """
import os, signal, sys
from pathlib import Path
from jdm.tracking import stage_run
with stage_run("extend", "smoke", {}, condition="hed", workspace=Path(sys.argv[1])):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_whose_process_died_is_marked_failed_by_the_next_stage(tmp_path, monkeypatch):
    import mlflow

    (tmp_path / ".dvc").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    killed = subprocess.run([sys.executable, "-c", KILLED_STAGE, str(tmp_path)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jdm").experiment_id
    (lost,) = client.search_runs([experiment])
    assert lost.info.status == "RUNNING"
    elsewhere = client.create_run(experiment, tags={"host": "another-machine", "pid": "1", "pid_started": "0"})
    monkeypatch.setenv(FLOW_RUN_ENV, "3f6c-flow-run")
    (tmp_path / "data/conditions/sr").mkdir(parents=True)
    (tmp_path / "data/conditions/sr/maps.safetensors").write_bytes(b"maps")
    with stage_run("extend", "smoke", {}, condition="sr", workspace=tmp_path):
        live = client.search_runs([experiment], "tags.condition = 'sr'")
        assert [r.info.status for r in live] == ["RUNNING"]  # its own run, alive, is not touched
    lost = client.get_run(lost.info.run_id)
    assert lost.info.status == "FAILED" and "ended without finishing the run" in lost.data.tags["failure"]
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"  # not this host's to judge
    # the UI opens it as model training (runs and models), not as a GenAI experiment of traces
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    assert live[0].data.tags["prefect_flow_run_id"] == "3f6c-flow-run"
    assert live[0].data.tags["pid"] == str(os.getpid())
    # the data it read, as a dataset input with a fingerprint of its files
    (data,) = live[0].inputs.dataset_inputs
    assert data.dataset.name == "data/conditions/sr" and data.dataset.source_type == "local"
    assert data.dataset.digest == folder_digest(tmp_path / "data/conditions/sr") and data.tags[0].value == "training"


def test_a_temporary_dvc_experiment_records_into_the_repository_it_came_from(tmp_path):
    from jdm.tracking import repository_root

    (tmp_path / ".dvc").mkdir()
    copy = tmp_path / ".dvc/tmp/exps/standalone/tmpab12cd"  # where `dvc exp run --temp` runs the stages
    (copy / ".dvc").mkdir(parents=True)
    (copy / "seeds/1").mkdir(parents=True)
    (tmp_path / "seeds").mkdir()
    assert repository_root(copy) == repository_root(copy / "seeds/1") == repository_root(tmp_path / "seeds") == tmp_path


STARTED_STAGE = """
import sys, time
from pathlib import Path
from jdm.tracking import stage_run
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # every process opens the new store at the same moment
with stage_run("conditions", "smoke", {}, condition=sys.argv[3], workspace=Path(sys.argv[1])):
    pass
"""


def test_stages_started_together_on_a_new_store_all_record(tmp_path, monkeypatch):
    """infra/repro.py starts two stages at once; on a new SQLite store both would create its tables,
    and MLflow's schema creation fails on the second unless the store is opened one process at a time."""
    import time

    import mlflow

    (tmp_path / ".dvc").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    at = str(time.time() + 8)  # after every process has imported what it needs
    procs = [subprocess.Popen([sys.executable, "-c", STARTED_STAGE, str(tmp_path), at, name], stderr=subprocess.PIPE,
                              text=True) for name in ("canny", "hed", "depth")]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-1500:] for e in errors)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("jdm").experiment_id])
    assert sorted(r.data.tags["condition"] for r in runs) == ["canny", "depth", "hed"]
