"""`make serve` for real: a Prefect server, a process work pool and worker with the deployments
applied, an MLflow server, on free loopback ports; then `prefect deployment run jdm/add-control`
as a user types it. Everything started is stopped by PID at the end."""

import json
import subprocess
import sys

import pytest

from ..conftest import REPO
from .conftest import launch_and_kill_after_checkpoints, lose_output, params_file, resumed_steps, run

sys.path.insert(0, str(REPO / "infra"))
from services import Services, _alive, free_port  # noqa: E402

PLUGIN = '''
import torch.nn.functional as F
from jdm.conditions import Condition


class Blur(Condition):
    name, channels = "blur", 1

    def extract(self, images):
        return F.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)
'''


@pytest.fixture
def services(smoke_workspace, tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "team_conditions.py").write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "plugins"))  # the worker imports the user's plugin
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # never the user's ~/.prefect
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")  # the worker picks up runs sooner (default 10 s)
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")  # Prefect's least: a lost run found in 60 s
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    svc = Services(smoke_workspace, state_dir=tmp_path / "state")
    prefect_port, mlflow_port = free_port(), free_port()
    urls = svc.serve(prefect_port, mlflow_port)
    pids = svc.pids()
    yield svc, urls, svc.env(prefect_port, mlflow_port)
    svc.stop()
    assert not any(_alive(pid) for pid in pids.values())


def deployment_run(params, env, cwd):
    cmd = ["prefect", "deployment", "run", "jdm/add-control", "--watch"]
    for p in params:
        cmd += ["-p", p]
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}  # the profile `serve` set must suffice
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.e2e
def test_add_control_deployment_trains_registers_resumes_after_a_lost_worker_and_fails_fast(services, smoke_workspace):
    import time

    from mlflow import MlflowClient

    svc, urls, env = services
    work = smoke_workspace
    client = MlflowClient(urls["mlflow"])
    experiment = client.get_experiment_by_name("jdm").experiment_id
    started = int(time.time() * 1000)
    assert set(svc.pids()) == {"prefect-server", "mlflow-server", "prefect-worker"}
    lose_output(work, "extend@hed", "models/jdm/controlnet-hed")  # the flow must build it again
    # two add-control runs for the same condition at once: they queue on the workspace lock
    runs = [deployment_run(["condition=hed"], env, work) for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in runs]
    for p, out in zip(runs, outputs):
        assert p.returncode == 0 and "Completed" in out, out[-3000:]
    assert (work / "models/jdm/controlnet-hed/diffusion_pytorch_model.safetensors").is_file()
    status = subprocess.run(["dvc", "status", "extend@hed"], cwd=work, capture_output=True, text=True, env=env)
    assert "changed" not in status.stdout, status.stdout
    # one trained, the other found it done
    trained_hed = client.search_runs([experiment], f"tags.condition = 'hed' and tags.stage = 'extend' "
                                                   f"and attributes.start_time > {started}")
    assert len(trained_hed) == 1, [r.info.run_id for r in trained_hed]

    # a plugin from outside the repository, on a worker lost mid-training (its flow run and the stage die
    # with it, as on a lost machine): its heartbeats stop, the automations crash it and queue it again, and
    # a new worker runs the same flow run, which resumes from the stage's checkpoint instead of starting over
    import psutil

    blur = ["condition=team_conditions:Blur", "steps=20"]
    ckpt = work / "checkpoints/extend-team_conditions-Blur"
    submit = ["prefect", "deployment", "run", "jdm/add-control"] + [x for b in blur for x in ("-p", b)]
    lost_flow_run = run(submit, work, env=env).stdout.split("UUID: ")[1].split()[0]
    deadline = time.time() + 300
    while not list(ckpt.glob("step-*.safetensors")) and time.time() < deadline:
        time.sleep(0.1)
    worker = psutil.Process(svc.pids()["prefect-worker"])
    lost = [worker] + worker.children(recursive=True)
    assert any("extend" in " ".join(p.cmdline()) for p in lost[1:])  # the stage was running under it
    for proc in lost:
        proc.kill()
    psutil.wait_procs(lost, timeout=30)
    assert list(ckpt.glob("step-*.safetensors")), "no checkpoint survived the lost worker"
    svc.start_worker(env)
    inspect = ["prefect", "flow-run", "inspect", lost_flow_run, "--output", "json"]
    deadline = time.time() + 600
    while (lost := json.loads(run(inspect, work, env=env).stdout))["state"]["type"] not in ("COMPLETED", "FAILED") \
            and time.time() < deadline:
        time.sleep(3)
    assert lost["state"]["type"] == "COMPLETED" and lost["run_count"] == 2, lost["state"]
    assert lost["name"] == "add-control-team_conditions:Blur"  # the flow run names say what ran
    assert (work / "models/jdm/controlnet-team_conditions-Blur/diffusion_pytorch_model.safetensors").is_file()
    resumed = json.loads((work / "metrics/extend-team_conditions-Blur.json").read_text())
    assert resumed["resumed_from_step"] >= 2 and resumed["steps"] == 20, resumed
    assert not ckpt.exists()
    # the extension's MLflow run the lost worker left running was marked failed by the stage after it
    blur_runs = client.search_runs([experiment], "tags.condition = 'team_conditions:Blur' and tags.stage = 'extend'")
    assert sorted(r.info.status for r in blur_runs) == ["FAILED", "FINISHED"], [r.info.status for r in blur_runs]
    finished = next(r for r in blur_runs if r.info.status == "FINISHED")
    # a link artifact to each MLflow run the flow run made, those runs tagged with its id
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[finished.data.tags["prefect_flow_run_id"]])))
        # the same flow run went Running, Crashed (by the heartbeat automation), AwaitingRetry, Running, Completed
        states = [(st.name, st.message or "") for st in prefect.read_flow_run_states(lost_flow_run)]
    assert [name for name, _ in states if name in ("Running", "Crashed", "AwaitingRetry", "Completed")] == \
        ["Running", "Crashed", "AwaitingRetry", "Running", "Completed"], states
    assert "its worker was lost" in dict(states)["Crashed"]
    assert finished.data.tags["prefect_flow_run_id"] == lost_flow_run  # the retried run trained it
    # Prefect stores a link artifact as Markdown: [text](address)
    assert any(f"/runs/{finished.info.run_id})" in (a.data or "") for a in artifacts), [a.data for a in artifacts]

    for c in ("hed", "team_conditions:Blur"):
        name = "jdm-controlnet-" + c.replace(":", "-")
        version = client.get_model_version_by_alias(name, "newest")
        trained = client.get_run(version.run_id)
        assert trained.data.tags["condition"] == c and trained.data.tags["stage"] == "extend"
        assert any(a.path == "controlnet" for a in client.list_artifacts(trained.info.run_id))
    # what is registered is an MLflow model: it loads by its alias, through the server, and draws an image
    import io

    import mlflow
    from PIL import Image

    mlflow.set_tracking_uri(urls["mlflow"])
    model = mlflow.pyfunc.load_model("models:/jdm-controlnet-team_conditions-Blur@newest")
    images = model.predict(model.input_example, params={"seed": 1})["image"]
    assert len(images) == 1 and Image.open(io.BytesIO(images[0])).size == (16, 16)

    # the GPU work-pool templates are accepted by the server (prefect-kubernetes / prefect-docker installed)
    for kind in ("kubernetes", "docker"):
        run(["prefect", "work-pool", "create", f"jdm-gpu-{kind}", "--type", kind, "--base-job-template",
             str(REPO / f"infra/work-pools/{kind}-gpu.json")], work, env=env)
        pool = json.loads(run(["prefect", "work-pool", "inspect", f"jdm-gpu-{kind}", "--output", "json"], work,
                              env=env).stdout)
        assert pool["type"] == kind and "gpu" in json.dumps(pool["base_job_template"])

    bad = deployment_run(["condition=scribble"], env, work)
    out = bad.communicate(timeout=300)[0]
    assert bad.returncode != 0 and "Failed" in out, out[-3000:]
    # the reason is the run's state message, what the Prefect UI shows
    run_id = out.split("UUID: ")[1].split()[0]
    state = json.loads(run(["prefect", "flow-run", "inspect", run_id, "--output", "json"], work, env=env).stdout)["state"]
    assert state["type"] == "FAILED"
    assert "unknown condition 'scribble'; available conditions: canny, depth, hed, sr" in state["message"], state
    assert "dvc_repro" not in out  # failed before any stage ran


@pytest.mark.e2e
def test_a_training_stage_runs_under_accelerate_on_two_cpu_processes(smoke_workspace):
    """The multi-GPU code path on this machine: `accelerate launch` with two gloo processes."""
    from mlflow import MlflowClient

    work = smoke_workspace
    pf = params_file(work, "accelerate.yaml", threads=1, teacher={"steps": 24},  # 1 thread each: 2 cores
                     checkpoint={"every": 4, "keep": 2})
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jdm").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment])}
    cmd = ["accelerate", "launch", "--config_file", str(REPO / "infra/accelerate/cpu_2proc.yaml"),
           "-m", "jdm.cli", "--params", pf, "teacher"]
    # killed (both processes) once each has a checkpoint; rerun, both resume from the step they share
    ckpt = work / "checkpoints/teacher"
    launch_and_kill_after_checkpoints(cmd, work, ckpt)
    out = run(cmd, work)
    resumed = resumed_steps(out.stdout + out.stderr)
    assert len(resumed) == 2 and len({step for step, _ in resumed}) == 1, resumed  # the same step
    assert {proc for _, proc in resumed} == {"0", "1"}, resumed
    assert not ckpt.exists()
    metrics = json.loads((work / "metrics/teacher-train.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["num_parameters"] > 0
    for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (work / "models/teacher" / f).is_file(), f
    new = [r for r in client.search_runs([experiment]) if r.info.run_id not in before]
    # one finished run, from the main process only (the killed attempt's run stays RUNNING, as MLflow leaves it)
    assert [r.data.tags["stage"] for r in new if r.info.status == "FINISHED"] == ["teacher"]
    assert len(new) == 2
