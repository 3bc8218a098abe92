"""`dvc repro` on the smoke profile in a temporary copy of the repository: every stage runs, writes
its outputs, and leaves one MLflow run; a second `dvc repro` has nothing to do."""

import json
import os
import shutil
import subprocess

import pytest

from .conftest import REPO

STAGE_RUNS = {"data", "annotator-hed", "annotator-depth", "annotator-classifier", "conditions", "teacher",
              "evaluate-teacher"}


def workspace_copy(dst):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def run(cmd, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.e2e
def test_smoke_pipeline_end_to_end(tmp_path):
    import mlflow

    work = workspace_copy(tmp_path / "repo")
    run(["jdm", "profile", "smoke"], work)
    run(["dvc", "repro"], work)

    for path in ["data/prepared/train.safetensors", "data/prepared/embeddings.safetensors",
                 "models/annotators/hed/hed.safetensors", "models/annotators/depth/depth.safetensors",
                 "models/annotators/classifier/classifier.safetensors", "models/teacher/unet/config.json",
                 "models/teacher/unet/diffusion_pytorch_model.safetensors", "models/teacher/scheduler/scheduler_config.json",
                 *[f"data/conditions/{c}/maps.safetensors" for c in ("canny", "hed", "depth", "sr")]]:
        assert (work / path).is_file(), path
    teacher = json.loads((work / "metrics/teacher.json").read_text())
    assert teacher["num_samples"] == 16 and teacher["num_reference"] == 32
    assert 0.0 <= teacher["prompt_accuracy"] <= 1.0 and teacher["fid_inception"] > 0 and teacher["fid_classifier"] > 0

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("jdm")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags["stage"] for r in runs} == STAGE_RUNS
    assert all(r.info.status == "FINISHED" and r.data.tags["profile"] == "smoke" and r.data.tags["git_commit"]
               for r in runs)
    assert sorted(r.data.tags["condition"] for r in runs if r.data.tags["stage"] == "conditions") == \
        ["canny", "depth", "hed", "sr"]
    ev = next(r for r in runs if r.data.tags["stage"] == "evaluate-teacher")
    assert "prompt_accuracy" in ev.data.metrics and ev.data.params["evaluation.num_inference_steps"] == "4"
    assert any(a.path == "teacher_samples.png" for a in client.list_artifacts(ev.info.run_id))
    teacher_run = next(r for r in runs if r.data.tags["stage"] == "teacher")
    losses = client.get_metric_history(teacher_run.info.run_id, "loss")
    assert len(losses) >= 2

    again = run(["dvc", "repro"], work)
    assert "Running stage" not in again.stdout
    status = run(["dvc", "status"], work)
    assert "changed" not in status.stdout
