"""The JDM phases data-parallel (jdm/training/parallel.py): `accelerate launch` with two gloo CPU
processes on smoke, each on half of the batch a one-process run draws, train what that run trains.
jdm.batch_size is the batch of all processes together, so the two runs share their params.yaml."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ..conftest import REPO
from .conftest import launch_and_kill_after_checkpoints, params_file, resumed_steps, run

LAUNCH = ["accelerate", "launch", "--config_file", str(REPO / "infra/accelerate/cpu_2proc.yaml"), "-m", "jdm.cli"]


def weights(folder):
    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_training(one, two, start):
    """The same training up to float rounding: on the weights whose starting values `start` holds, the two
    runs end apart by a small fraction of how far training moved them (Adam's first steps are sign-like,
    so a gradient entry near 0 that rounds to the other sign moves its weight by 2 lr: an element-wise
    tolerance would be either loose or flaky). Measured on smoke: 5e-5 of it for the warm-up's UNet."""
    assert one.keys() == two.keys()
    moved = torch.cat([(one[k] - start[k]).flatten() for k in start]).norm()
    apart = torch.cat([(one[k] - two[k]).flatten() for k in start]).norm()
    assert moved > 0
    assert apart <= 1e-3 * moved, (apart.item(), moved.item())


def zero_convolutions(controlnet):
    """A ControlNet's output convolutions, which start at zero (ControlNetModel.from_unet)."""
    return {k: torch.zeros_like(v) for k, v in controlnet.items()
            if ":controlnet_down_blocks." in k or ":controlnet_mid_block." in k}


@pytest.mark.e2e
def test_jdm_phases_on_two_processes_train_what_one_process_trains(smoke_workspace, tmp_path):
    from mlflow import MlflowClient

    work = smoke_workspace
    jdm_models = work / "models/jdm"
    # the smoke build's warm-up and hed extension: one process, batch 8 (smoke's jdm.batch_size)
    one = {name: weights(jdm_models / name) for name in ("generator", "controlnet-hed")}
    shutil.copytree(jdm_models, tmp_path / "one")
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jdm").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment])}
    two_processes = params_file(work, "two.yaml", threads=1)  # the same params, a thread each: 4 of the 8 rows each

    # the warm-up, killed once both processes have a checkpoint, then rerun: both resume from the step they share
    warmup = LAUNCH + ["--params", two_processes, "warmup"]
    launch_and_kill_after_checkpoints(warmup, work, work / "checkpoints/warmup")
    out = run(warmup, work)
    resumed = resumed_steps(out.stdout + out.stderr)
    assert len(resumed) == 2 and len({step for step, _ in resumed}) == 1, resumed
    assert {process for _, process in resumed} == {"0", "1"}, resumed
    teacher = weights(work / "models/teacher/unet")
    start = {k: teacher[k.split("/", 1)[1]] for k in one["generator"] if k.startswith("unet/")}  # the teacher's copy
    assert_same_training(one["generator"], weights(jdm_models / "generator"), start)

    # the extension from the one-process warm-up (so both start from the same generator and fake score)
    for name in ("generator", "fake_score"):
        shutil.rmtree(jdm_models / name)
        shutil.copytree(tmp_path / "one" / name, jdm_models / name)
    # started as DVC starts it, `jdm extend hed`, launched by the variable a GPU work pool's job sets
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    run(["jdm", "--params", two_processes, "extend", "hed"], work,
        env={**env, "JDM_ACCELERATE_CONFIG": str(REPO / "infra/accelerate/cpu_2proc.yaml")})
    assert_same_training(one["controlnet-hed"], weights(jdm_models / "controlnet-hed"), zero_convolutions(one["controlnet-hed"]))

    # the main process alone records: one finished MLflow run per stage, which ran on two processes
    new = [r for r in client.search_runs([experiment]) if r.info.run_id not in before]
    finished = {r.data.tags["stage"]: r for r in new if r.info.status == "FINISHED"}
    assert sorted(finished) == ["extend", "warmup"] and len(new) == 3  # and the killed warm-up's run, not finished
    assert all(r.data.metrics["num_processes"] == 2 for r in finished.values())
    assert not (work / "checkpoints/warmup").exists() and not (work / "checkpoints/extend-hed").exists()


@pytest.mark.e2e
def test_an_evaluation_on_two_processes_writes_what_one_process_writes(smoke_workspace, tmp_path):
    """`jdm reference` and `jdm evaluate` launched on two processes (as a GPU work pool launches them):
    each process samples every other batch from the one noise stream, the main process scores all of
    them, so the reference features and every metric but the timings equal a one-process run's."""
    import json

    from mlflow import MlflowClient

    work = smoke_workspace
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("jdm").experiment_id
    # several batches, so both processes sample; a thread each, as the launched processes take
    params = params_file(work, "eval.yaml", threads=1, evaluation={"batch_size": 8})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    outputs = {}
    for processes, extra in (("one", {}), ("two", {"JDM_ACCELERATE_CONFIG": str(REPO / "infra/accelerate/cpu_2proc.yaml")})):
        before = {r.info.run_id for r in client.search_runs([experiment])}
        for command in (["reference"], ["evaluate", "hed", "--methods", "jdm,controlnet-50"]):
            run(["jdm", "--params", params, *command], work, env={**env, **extra})
        new = [r for r in client.search_runs([experiment]) if r.info.run_id not in before]
        recorded = sorted((r.data.tags["stage"], r.data.metrics.get("num_processes")) for r in new
                          if r.data.tags["stage"] in ("reference", "evaluate"))
        count = 2 if extra else 1  # the main process alone records, once per stage and method
        assert recorded == [("evaluate", count), ("evaluate", count), ("reference", count)], recorded
        outputs[processes] = {
            "reference": load_file(work / "data/reference/features.safetensors"),
            **{m: json.loads((work / f"metrics/eval/{m}-hed.json").read_text()) for m in ("jdm", "controlnet-50")}}
    one, two = outputs["one"], outputs["two"]
    assert one["reference"].keys() == two["reference"].keys()
    assert all(torch.equal(one["reference"][k], two["reference"][k]) for k in one["reference"])
    timings = {"sample_seconds", "latency_ms"}
    for method in ("jdm", "controlnet-50"):
        assert one[method]["num_samples"] > params_batch(work, params)  # more than one batch: both processes sampled
        assert {k: v for k, v in one[method].items() if k not in timings} == \
            {k: v for k, v in two[method].items() if k not in timings}, method


def params_batch(work, name):
    import yaml
    return yaml.safe_load((work / name).read_text())["evaluation"]["batch_size"]
