"""`dvc repro` on the smoke profile in a temporary copy of the repository: every stage runs, writes
its outputs, and leaves one MLflow run; a second `dvc repro` has nothing to do."""

import json
import os
import re
import subprocess
import warnings

import pytest
import yaml

from .conftest import params_file, run

STAGE_RUNS = {"data", "annotator-hed", "annotator-depth", "annotator-classifier", "judge-depth", "conditions", "teacher",
              "evaluate-teacher", "warmup", "extend", "controlnet-50", "reference", "evaluation", "evaluate", "report"}


@pytest.mark.e2e
def test_smoke_pipeline_end_to_end(smoke_workspace):
    import mlflow

    work = smoke_workspace

    for path in ["data/prepared/train.safetensors", "data/prepared/embeddings.safetensors",
                 "models/annotators/hed/hed.safetensors", "models/annotators/depth/depth.safetensors",
                 "models/annotators/classifier/classifier.safetensors", "models/judges/depth/depth.safetensors",
                 "models/teacher/unet/config.json",
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
    assert 0.0 <= teacher["prompt_accuracy"] <= 1.0 and teacher["fid_classifier"] > 0
    assert "fid_inception" not in teacher  # smoke turns Inception FID off (CI time); test_evaluation covers it

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
            assert any(a.path.endswith("_validation.png") for a in client.list_artifacts(r.info.run_id))
    for c in ("hed", "depth", "sr"):
        ext = json.loads((work / f"metrics/extend-{c}.json").read_text())
        assert ext["condition"] == c and ext["generator_unchanged"] == 1.0 and ext["num_eval_maps"] == 32
    # the validation curve (dvc plots): step 0, then every jdm.eval_every steps, on the validation maps
    curve = json.loads((work / "metrics/curves/warmup.json").read_text())
    assert [point["step"] for point in curve] == [0, 3, 6]
    assert all({"eval_fid_classifier", "eval_kid_classifier", "eval_consistency", "eval_prompt_accuracy"} <= set(point)
               for point in curve)
    # `dvc plots show` draws every plot of dvc.yaml (its `plots:` ids, the stages' curves, the sample grids'
    # folder) without an error, each curve with data
    ids = [next(iter(p)) if isinstance(p, dict) else p for p in yaml.safe_load((work / "dvc.yaml").read_text())["plots"]]
    curves = ["metrics/curves/warmup.json", *(f"metrics/curves/extend-{c}.json" for c in ("hed", "depth", "sr"))]
    shown = json.loads(run(["dvc", "plots", "show", "--json", *ids, *curves], work).stdout)
    assert "errors" not in shown, shown["errors"]
    grids = {f"reports/samples/{m}-{c}.png" for m in ("jdm", "controlnet-50") for c in ("canny", "hed", "depth", "sr")}
    assert set(ids + curves) - {"reports/samples"} | grids <= set(shown["data"])
    assert all(p[0]["content"]["data"]["values"] for p in shown["data"].values() if p[0]["type"] == "vega")
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
    # an RGB image for a 1-channel ControlNet is read as gray, as diffusers converts control images
    save_png(np.repeat(maps["hed"][..., None], 3, axis=2), tmp_path / "rgb.png")
    assert sample("hed", tmp_path / "rgb.png", "a photo of an ankle boot", out="rgb-out.png") == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rgb-out.png")), image)
    assert sample("scribble", tmp_path / "hed.png", "x") == 2
    assert "no ControlNet for condition 'scribble'" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()
    # a prompt longer than the text encoder takes is truncated with a warning, not a crash
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sample("hed", tmp_path / "hed.png", "a photo of an ankle boot " * 10, out="long.png") == 0
    assert any("truncated" in str(w.message) for w in caught)

    # the rest of the bad-input catalogue (README): unreadable, truncated and odd-typed images, unicode and
    # empty prompts, damaged weights
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    good = (tmp_path / "hed.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[:len(good) // 2])
    for bad_file in ("garbage.png", "truncated.png", "missing.png"):
        assert sample("hed", tmp_path / bad_file, "x") == 2
        assert "is not a readable image" in capsys.readouterr().err
    Image.fromarray(maps["hed"].astype(np.float32), mode="F").save(tmp_path / "float.tiff")
    assert sample("hed", tmp_path / "float.tiff", "x") == 2
    assert "pixel mode F; allowed: 8-bit grayscale or RGB" in capsys.readouterr().err
    deep = (maps["hed"].astype(np.uint32) * 257).astype(np.uint16)  # the same map as a 16-bit PNG
    Image.fromarray(deep).save(tmp_path / "hed16.png")
    assert sample("hed", tmp_path / "hed16.png", "a photo of an ankle boot", out="deep.png") == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "deep.png")), image)  # 16-bit / 65535 == 8-bit / 255
    assert sample("hed", tmp_path / "hed.png", "une botte à lacets — 靴 👢", out="unicode.png") == 0
    assert sample("hed", tmp_path / "hed.png", "", out="empty.png") == 0  # the unconditional prompt
    assert not (tmp_path / "no.png").exists()

    import shutil
    models = tmp_path / "models"
    shutil.copytree(work / "models/jdm", models)
    weights = models / "controlnet-hed/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["sample", "--condition", "hed", "--control", str(tmp_path / "hed.png"), "--prompt", "x",
                 "--out", str(tmp_path / "no.png"), "--models", str(models)]) == 2
    err = capsys.readouterr().err
    assert f"{models / 'controlnet-hed'} cannot be loaded" in err and "dvc checkout" in err, err

    # the library refuses what the CLI cannot produce: no prompts, integer or out-of-range maps
    import torch

    from jdm.errors import UserError
    from jdm.pipeline import OneStepControlPipeline
    pipe = OneStepControlPipeline.from_workspace(work / "models/jdm", ["hed"])
    hed = torch.from_numpy(maps["hed"]).float()[None, None] / 255
    for prompts, control, message in [([], hed[:0], "no prompts given"),
                                      (["x"], (hed * 255).byte(), "must be a float tensor in [0,1], got dtype torch.uint8"),
                                      (["x"], hed * 255, "must lie in [0,1]")]:
        with pytest.raises(UserError, match=re.escape(message)):
            pipe(prompts, {"hed": control})
    assert pipe("a photo of a boot", {"hed": hed}, output_type="pt").images.shape == (1, 1, 16, 16)  # one prompt, a string


def digest(folder):
    import hashlib
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_extension_resumes_from_its_checkpoint_after_a_kill(smoke_workspace):
    """SIGKILL at a random point after the first checkpoint; the rerun resumes from the newest one and
    ends with the same weights, bit for bit, as an unbroken run (CPU, same threads: deterministic), and
    with the same validation curve, row for row (the killed run's records continue)."""
    import random
    import signal
    import time

    from safetensors.torch import load_file

    work = smoke_workspace
    pf = params_file(work, "resume.yaml", extend={"steps": 20}, jdm={"eval_every": 5}, checkpoint={"every": 5, "keep": 2})
    cmd = ["jdm", "--params", pf, "extend", "sr"]
    ckpt_dir = work / "checkpoints/extend-sr"
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list(ckpt_dir.glob("step-*.safetensors")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    delay = random.uniform(0, 3)  # a step here takes ~0.2 s: anywhere from step 5 to the end
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sorted(p.name for p in ckpt_dir.glob("step-*.safetensors"))
    assert kept and len(kept) <= 2, kept  # bounded
    resumed = run(cmd, work)
    step = int(resumed.stdout.split("resumed from the checkpoint of step ")[1].split()[0])
    assert step >= 5 and step % 5 == 0 and kept[-1] == f"step-{step:08d}.safetensors", (delay, kept, step)
    assert not ckpt_dir.exists()  # removed once the outputs are saved
    interrupted = load_file(work / "models/jdm/controlnet-sr/diffusion_pytorch_model.safetensors")
    curve_file = work / "metrics/curves/extend-sr.json"
    interrupted_curve = json.loads(curve_file.read_text())
    fresh = run(cmd, work)
    assert "resumed from" not in fresh.stdout
    uninterrupted = load_file(work / "models/jdm/controlnet-sr/diffusion_pytorch_model.safetensors")
    # all state (weights, optimisers, EMA target, RNGs, data position) came back: one unbroken run's weights
    assert interrupted.keys() == uninterrupted.keys()
    assert all(torch_equal(interrupted[k], uninterrupted[k]) for k in uninterrupted), f"killed {delay:.2f} s after step 5"
    assert [row["step"] for row in interrupted_curve] == [0, 5, 10, 15, 20]
    assert interrupted_curve == json.loads(curve_file.read_text()), (delay, step)


def torch_equal(a, b):
    import torch
    return torch.equal(a, b)


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


class BlurPair(Blur):
    """Two channels (no image format's gray or RGB): the image under a 5x5 and a 9x9 box filter."""
    channels = 2

    def extract(self, images):
        return torch.cat([F.avg_pool2d(images, k, stride=1, padding=k // 2, count_include_pad=False) for k in (5, 9)], 1)


class BlurFive(Blur):
    """Five channels, more than a PNG holds: five box filters."""
    channels = 5

    def extract(self, images):
        return torch.cat([F.avg_pool2d(images, k, stride=1, padding=k // 2, count_include_pad=False)
                          for k in (1, 3, 5, 7, 9)], 1)


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

    pf = params_file(work, "nan.yaml", checkpoint={"every": 2, "keep": 2}, extend={"steps": 8})
    bad = run_fail(["jdm", "--params", pf, "extend", "user_conditions:BlurNanAt5"], work, env)
    assert "diverged at step 5" in bad.stderr and "checkpoint of step 4 is kept" in bad.stderr, bad.stderr[-2000:]
    assert (work / "checkpoints/extend-user_conditions-BlurNanAt5/step-00000004.safetensors").is_file()
    assert not (work / "models/jdm/controlnet-user_conditions-BlurNanAt5").exists()
    assert digest(work / "models/jdm/generator") == generator_before


@pytest.mark.e2e
def test_plugin_conditions_of_any_channel_count_train_and_sample(smoke_workspace, tmp_path):
    """Maps of 2 and 5 channels go through `jdm conditions` and `jdm extend` (grids show one row per
    channel); `jdm sample` reads a 2-channel map from a gray+alpha PNG, and names the limit for 5."""
    import numpy as np
    from PIL import Image

    work = smoke_workspace
    (tmp_path / "user_conditions.py").write_text(PLUGIN)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(tmp_path)
    pf = params_file(work, "short.yaml", extend={"steps": 4})
    for name, channels in (("user_conditions:BlurPair", 2), ("user_conditions:BlurFive", 5)):
        for stage in ("conditions", "extend"):
            out = subprocess.run(["jdm", "--params", pf, stage, name], cwd=work, capture_output=True, text=True, env=env)
            assert out.returncode == 0, out.stderr[-2000:]
        config = json.loads((work / f"models/jdm/controlnet-{name.replace(':', '-')}/config.json").read_text())
        assert config["conditioning_channels"] == channels
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 2), dtype=np.uint8), "LA").save(tmp_path / "la.png")
    sample = ["jdm", "sample", "--control", str(tmp_path / "la.png"), "--prompt", "a bag"]
    run([*sample, "--condition", "user_conditions:BlurPair", "--out", str(tmp_path / "pair.png")], work)
    assert Image.open(tmp_path / "pair.png").size == (16, 16)
    five = run_fail([*sample, "--condition", "user_conditions:BlurFive", "--out", str(tmp_path / "five.png")], work)
    assert "takes 5 channels, more than an image holds (1-4)" in five.stderr, five.stderr[-2000:]


@pytest.mark.e2e
def test_own_captioned_images_train_a_controlnet(smoke_workspace, tmp_path):
    """data.source imagefolder, as a user brings their images: a folder of captioned RGB PNGs and JPEGs of
    mixed sizes, without labels (diffusers' layout: file_name and text), through data, conditions@hed and
    extend@hed by `dvc repro`; a bad folder is refused by name and what was prepared before stays."""
    from jdm.io import load_tensors

    from ..conftest import write_image_folder

    work = smoke_workspace
    photos = write_image_folder(tmp_path / "photos", n=160, held_out=64, labels=False)  # smoke holds out 64 maps
    params_file(work, "params.yaml", data={"source": "imagefolder", "root": str(photos), "caption_classes": 2})
    out = run(["dvc", "repro", "extend@hed"], work, timeout=900).stdout
    for stage in ("data", "classifier", "conditions@hed", "teacher", "warmup", "extend@hed"):
        assert f"Running stage '{stage}'" in out, stage
    train = load_tensors(work / "data/prepared/train.safetensors")
    assert train["images"].shape == (96, 3, 16, 16)  # RGB at the profile's size
    prepared = json.loads((work / "data/prepared/prompts.json").read_text())
    # no labels: the captions' two clusters are the classes prompt accuracy and the classifier use
    assert sorted(name[:5] for name in prepared["class_names"]) == ["a cat", "a dog"], prepared["class_names"]
    assert "a cat, number 0" in prepared["prompts"] and sorted(set(prepared["prompt_classes"])) == [-1, 0, 1]
    assert load_tensors(work / "data/conditions/hed/maps.safetensors")["eval"].shape[1:] == (1, 16, 16)
    assert json.loads((work / "models/teacher/unet/config.json").read_text())["in_channels"] == 3
    hed = json.loads((work / "metrics/extend-hed.json").read_text())
    assert 0 <= hed["consistency"] and 0 <= hed["prompt_accuracy"] <= 1, hed
    # the teacher is scored on the held-out captions (Fashion-MNIST: its classes' templates)
    run(["dvc", "repro", "evaluate-teacher"], work)
    assert 0 <= json.loads((work / "metrics/teacher.json").read_text())["prompt_accuracy"] <= 1
    # DVC tracks the folder: a new image makes the data stage stale; without its caption it is refused
    (photos / "train/stray.png").write_bytes((photos / "train/im1.png").read_bytes())
    assert "data" in run(["dvc", "status", "data"], work).stdout.split(":")[0]
    before = digest(work / "data/prepared")
    failed = subprocess.run(["jdm", "data"], cwd=work, capture_output=True, text=True)
    assert failed.returncode == 2 and "stray.png: no caption (not in metadata.jsonl" in failed.stderr, failed.stderr
    assert digest(work / "data/prepared") == before
    # one caption for every image: nothing for prompt accuracy to tell apart, and the classifier says so
    (photos / "train/stray.png").unlink()
    for metadata in photos.rglob("metadata.jsonl"):
        metadata.write_text(re.sub(r'"text": "[^"]*"', '"text": "a pet"', metadata.read_text()))
    run(["jdm", "data"], work)
    failed = subprocess.run(["jdm", "annotator", "classifier"], cwd=work, capture_output=True, text=True)
    assert failed.returncode == 2 and "the classifier needs two classes or more" in failed.stderr, failed.stderr
