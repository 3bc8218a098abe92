"""`dvc repro` on the smoke profile in a temporary copy of the repository: every stage runs, writes
its outputs, and leaves one MLflow run; a second `dvc repro` has nothing to do."""

import json
import os
import subprocess
import warnings

import pytest

from .conftest import params_file, run

STAGE_RUNS = {"data", "annotator-hed", "annotator-depth", "annotator-classifier", "conditions", "teacher",
              "evaluate-teacher", "warmup", "extend", "controlnet-50", "reference", "evaluate", "report"}


@pytest.mark.e2e
def test_smoke_pipeline_end_to_end(smoke_workspace):
    import mlflow

    work = smoke_workspace

    for path in ["data/prepared/train.safetensors", "data/prepared/embeddings.safetensors",
                 "models/annotators/hed/hed.safetensors", "models/annotators/depth/depth.safetensors",
                 "models/annotators/classifier/classifier.safetensors", "models/teacher/unet/config.json",
                 "models/teacher/unet/diffusion_pytorch_model.safetensors", "models/teacher/scheduler/scheduler_config.json",
                 *[f"data/conditions/{c}/maps.safetensors" for c in ("canny", "hed", "depth", "sr")],
                 "models/jdm/generator/unet/diffusion_pytorch_model.safetensors", "models/jdm/generator/jdm.json",
                 "models/jdm/generator/controlnet/diffusion_pytorch_model.safetensors",
                 "models/jdm/fake_score/unet/diffusion_pytorch_model.safetensors",
                 "models/jdm/fake_score/consistency_lora/pytorch_lora_weights.safetensors",
                 *[f"models/jdm/controlnet-{c}/diffusion_pytorch_model.safetensors" for c in ("hed", "depth", "sr")]]:
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
    assert [r.data.tags["condition"] for r in runs if r.data.tags["stage"] == "warmup"] == ["canny"]
    assert sorted(r.data.tags["condition"] for r in runs if r.data.tags["stage"] == "extend") == ["depth", "hed", "sr"]
    for r in runs:
        if r.data.tags["stage"] in ("warmup", "extend"):
            m = r.data.metrics
            assert {"loss_generator", "loss_fake_score", "loss_consistency", "consistency",
                    "consistency_without_controlnet", "prompt_accuracy"} <= set(m), r.data.tags
            assert all(v == v and abs(v) < 1e6 for v in m.values())  # finite
            assert len(client.get_metric_history(r.info.run_id, "loss_generator")) >= 2
            assert any(a.path.endswith("_map_controlled_uncontrolled.png") for a in client.list_artifacts(r.info.run_id))
    for c in ("hed", "depth", "sr"):
        ext = json.loads((work / f"metrics/extend-{c}.json").read_text())
        assert ext["condition"] == c and ext["generator_unchanged"] == 1.0 and ext["num_eval_maps"] == 32
    assert not (work / "checkpoints").exists() or not any((work / "checkpoints").iterdir())
    ev = next(r for r in runs if r.data.tags["stage"] == "evaluate-teacher")
    assert "prompt_accuracy" in ev.data.metrics and ev.data.params["evaluation.num_inference_steps"] == "4"
    assert any(a.path == "teacher_samples.png" for a in client.list_artifacts(ev.info.run_id))
    teacher_run = next(r for r in runs if r.data.tags["stage"] == "teacher")
    losses = client.get_metric_history(teacher_run.info.run_id, "loss")
    assert len(losses) >= 2

    again = run(["dvc", "repro"], work)
    assert "Running stage" not in again.stdout
    status = run(["dvc", "status", "dvc.yaml"], work)  # the main pipeline (paper/dvc.yaml runs by `make paper`)
    assert "changed" not in status.stdout


def run_fail(cmd, cwd, env=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0, f"{cmd} should have failed:\n{out.stdout[-2000:]}"
    return out


def save_png(array, path):
    from PIL import Image
    Image.fromarray(array).save(path)


@pytest.mark.e2e
def test_one_step_sampling_cli(smoke_workspace, tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    work = smoke_workspace
    maps = {c: load_file(work / f"data/conditions/{c}/maps.safetensors")["eval"][0, 0].numpy() for c in ("hed", "canny")}
    for c, m in maps.items():
        save_png(m, tmp_path / f"{c}.png")
    out = tmp_path / "boot.png"
    res = run(["jdm", "sample", "--condition", "hed", "--control", str(tmp_path / "hed.png"),
               "--prompt", "a photo of an ankle boot", "--out", str(out)], work)
    assert "1 network evaluation" in res.stdout
    image = np.asarray(Image.open(out))
    assert image.shape == (16, 16) and image.std() > 0
    # several controls at once: the generator's own (canny) plus an extension ControlNet (hed)
    both = tmp_path / "both.png"
    run(["jdm", "sample", "--condition", "canny", "--control", str(tmp_path / "canny.png"), "--condition", "hed",
         "--control", str(tmp_path / "hed.png"), "--prompt", "a photo of a sneaker", "--out", str(both)], work)
    assert not np.array_equal(np.asarray(Image.open(both)), image)

    # refusals and the long-prompt warning: the same `main`, called in-process (no second import of torch)
    from jdm.cli import main

    def sample(condition, control, prompt, out="no.png"):
        return main(["sample", "--condition", condition, "--control", str(control), "--prompt", prompt,
                     "--out", str(tmp_path / out), "--models", str(work / "models/jdm")])

    save_png(np.zeros((20, 20), np.uint8), tmp_path / "big.png")
    assert sample("hed", tmp_path / "big.png", "x") == 2
    err = capsys.readouterr().err
    assert "must have shape [1, 1, 16, 16]" in err and "[1, 1, 20, 20]" in err
    save_png(np.zeros((16, 16, 3), np.uint8), tmp_path / "rgb.png")
    assert sample("hed", tmp_path / "rgb.png", "x") == 2
    assert "[1, 3, 16, 16]" in capsys.readouterr().err
    assert sample("scribble", tmp_path / "hed.png", "x") == 2
    assert "no ControlNet for condition 'scribble'" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()
    # a prompt longer than the text encoder takes is truncated with a warning, not a crash
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sample("hed", tmp_path / "hed.png", "a photo of an ankle boot " * 10, out="long.png") == 0
    assert any("truncated" in str(w.message) for w in caught)


def digest(folder):
    import hashlib
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_extension_resumes_from_its_checkpoint_after_a_kill(smoke_workspace):
    import signal
    import time

    from safetensors.torch import load_file

    work = smoke_workspace
    pf = params_file(work, "resume.yaml", extend={"steps": 20}, jdm={"checkpoint_every": 5, "eval_every": 0})
    cmd = ["jdm", "--params", pf, "extend", "sr"]
    state = work / "checkpoints/extend-sr/state.pt"
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "no checkpoint written before the kill"
    resumed = run(cmd, work)
    step = int(resumed.stdout.split("resumed from the checkpoint of step ")[1].split()[0])
    assert step >= 5 and step % 5 == 0
    assert not state.exists()  # removed once the outputs are saved
    interrupted = load_file(work / "models/jdm/controlnet-sr/diffusion_pytorch_model.safetensors")
    fresh = run(cmd, work)
    assert "resumed from" not in fresh.stdout
    uninterrupted = load_file(work / "models/jdm/controlnet-sr/diffusion_pytorch_model.safetensors")
    # all state (weights, optimisers, EMA target, RNGs) came back: the same weights as one unbroken run
    assert all(torch_allclose(interrupted[k], uninterrupted[k]) for k in uninterrupted)


def torch_allclose(a, b):
    import torch
    return torch.allclose(a, b, atol=1e-6, rtol=1e-5)


PLUGIN = '''
import torch
import torch.nn.functional as F
from jdm.conditions import Condition


class Blur(Condition):
    """A control no built-in knows: the image blurred by a 5x5 box filter."""
    name = "blur"
    channels = 1

    def extract(self, images):
        return F.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)


class BlurNanAt5(Blur):
    """Blur whose likelihood turns NaN at the 5th generator step."""
    calls = 0

    def log_likelihood(self, x, c):
        type(self).calls += 1
        ll = super().log_likelihood(x, c)
        return ll * float("nan") if type(self).calls >= 5 else ll
'''


@pytest.mark.e2e
def test_plugin_condition_extends_the_frozen_generator_and_a_nan_stops_with_the_step(smoke_workspace, tmp_path):
    work = smoke_workspace
    (tmp_path / "user_conditions.py").write_text(PLUGIN)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(tmp_path)
    generator_before = digest(work / "models/jdm/generator")
    for name in ("user_conditions:Blur", "user_conditions:BlurNanAt5"):
        out = subprocess.run(["jdm", "conditions", name], cwd=work, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
    out = subprocess.run(["jdm", "extend", "user_conditions:Blur"], cwd=work, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (work / "models/jdm/controlnet-user_conditions-Blur/diffusion_pytorch_model.safetensors").is_file()
    ext = json.loads((work / "metrics/extend-user_conditions-Blur.json").read_text())
    assert ext["generator_unchanged"] == 1.0 and ext["consistency"] >= 0

    pf = params_file(work, "nan.yaml", jdm={"checkpoint_every": 2}, extend={"steps": 8})
    bad = run_fail(["jdm", "--params", pf, "extend", "user_conditions:BlurNanAt5"], work, env)
    assert "diverged at step 5" in bad.stderr and "checkpoint of step 4 is kept" in bad.stderr, bad.stderr[-2000:]
    assert (work / "checkpoints/extend-user_conditions-BlurNanAt5/state.pt").is_file()
    assert not (work / "models/jdm/controlnet-user_conditions-BlurNanAt5").exists()
    assert digest(work / "models/jdm/generator") == generator_before
