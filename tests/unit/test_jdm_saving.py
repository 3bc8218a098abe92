"""What the JDM stages write loads back to the same functions: generator + ControlNets as a one-step
pipeline, fake score + consistency LoRA, and checkpoints that refuse other settings."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from jdm.config import TextEncoderParams

from jdm.errors import UserError
from jdm.models.fake_score import build_fake_score, load_fake_score, save_fake_score
from jdm.models.generator import OneStepGenerator, controlnet_from_unet
from jdm.models.lora import consistency_mode, lora_parameters
from jdm.models.unet import build_noise_scheduler, build_unet
from jdm.objectives import VPSchedule
from jdm.text import TextEncoder
from jdm.pipeline import OneStepControlPipeline, load_generator, save_controlnet, save_generator


@pytest.fixture
def teacher(smoke_params):
    torch.manual_seed(0)
    unet = build_unet(smoke_params.teacher.unet, 16, 1, 384)  # MiniLM's width.eval().requires_grad_(False)
    return unet, build_noise_scheduler(smoke_params.teacher)


def randomise(module):
    with torch.no_grad():
        for q in module.parameters():
            q.add_(torch.randn_like(q) * 0.05)


def test_fake_score_and_lora_round_trip(teacher, tmp_path):
    fake, lora = build_fake_score(teacher[0], lora_rank=4)
    randomise(fake)  # base and LoRA weights both non-trivial
    save_fake_score(fake, tmp_path)
    loaded, loaded_lora = load_fake_score(tmp_path, lora_rank=4)
    assert len(loaded_lora) == len(lora)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 700])
    h, m = torch.randn(2, 4, 384), torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        for model_a, model_b in ((fake, loaded),):
            assert torch.allclose(model_a(x, t, h, encoder_attention_mask=m).sample,
                                  model_b(x, t, h, encoder_attention_mask=m).sample, atol=1e-6)
            with consistency_mode(model_a), consistency_mode(model_b):
                on_a = model_a(x, t, h, encoder_attention_mask=m).sample
                on_b = model_b(x, t, h, encoder_attention_mask=m).sample
            assert torch.allclose(on_a, on_b, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(fake), lora_parameters(loaded)))


TEXT = {"kind": "minilm", "path": None, "subfolder": None, "max_length": 8}


@pytest.fixture
def workspace(teacher, tmp_path):
    """The training stages' layout: the generator with its canny ControlNet, and a hed extension."""
    unet, noise_scheduler = teacher
    nets = {name: controlnet_from_unet(unet, 1, 1) for name in ("canny", "hed")}
    for net in nets.values():
        randomise(net)  # past the zero convolutions, so each control changes the output
    gen = OneStepGenerator(unet, {"canny": nets["canny"]}, VPSchedule.from_scheduler(noise_scheduler), t_gen=950)
    models = tmp_path / "models/jdm"
    save_generator(gen, noise_scheduler, models / "generator", {"image_size": 16, "image_channels": 1, "text_encoder": TEXT})
    save_controlnet(nets["hed"], "hed", models / "controlnet-hed")
    return models, gen, nets


def test_pipeline_loads_the_generator_with_several_controlnets(workspace):
    models, gen, nets = workspace
    loaded, sched, meta = load_generator(models / "generator", {"hed": models / "controlnet-hed"})
    assert sorted(loaded.names) == ["canny", "hed"] and meta["t_gen"] == 950
    assert isinstance(sched, DDPMScheduler)
    pipe = OneStepControlPipeline.from_workspace(models, ["canny", "hed"])
    assert isinstance(pipe, DiffusionPipeline) and pipe.conditions == ["canny", "hed"] and pipe.image_size == 16
    c = torch.rand(2, 1, 16, 16)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out_canny = pipe(["a", "b"], {"canny": c}, generator=g(), output_type="pt").images
    out_both = pipe(["a", "b"], {"canny": c, "hed": c}, generator=g(), output_type="pt").images
    assert out_canny.shape == (2, 1, 16, 16) and 0 <= out_canny.min() and out_canny.max() <= 1
    assert not torch.allclose(out_canny, out_both)
    half = pipe(["a", "b"], {"canny": c, "hed": c}, generator=g(), output_type="pt",
                controlnet_conditioning_scale={"canny": 1.0, "hed": 0.5}).images
    assert not torch.allclose(half, out_both) and not torch.allclose(half, out_canny)
    # the same as the in-memory generator it was saved from, with the same text encoder and noise
    hidden, mask = TextEncoder.from_params(TextEncoderParams(**TEXT)).encode(["a", "b"])
    z = torch.randn((2, 1, 16, 16), generator=g())
    with torch.no_grad():
        assert torch.allclose(out_canny, gen(z, hidden, mask, {"canny": c}).add(1).div(2).clamp(0, 1), atol=1e-5)
    with pytest.raises(UserError, match=r"\[2, 1, 16, 16\].*got \[2, 1, 8, 8\]"):
        pipe(["a", "b"], {"hed": torch.rand(2, 1, 8, 8)})
    with pytest.raises(UserError, match="no ControlNet loaded for condition 'depth'; loaded: canny, hed"):
        pipe(["a", "b"], {"depth": c})
    with pytest.raises(UserError, match="output_type 'latent' is not one of: pil, np, pt"):
        pipe(["a", "b"], {"canny": c}, output_type="latent")
    with pytest.raises(UserError, match="trained for condition 'hed', not 'depth'"):
        load_generator(models / "generator", {"depth": models / "controlnet-hed"})


@pytest.mark.parametrize("conditions", [["canny"], ["canny", "hed"]])
def test_pipeline_saves_one_folder_that_loads_back(workspace, tmp_path, conditions):
    """save_pretrained writes diffusers' layout (one ControlNet, or several as MultiControlNetModel) and
    a model card; from_pretrained gives the same images, in each output type."""
    models, _, _ = workspace
    pipe = OneStepControlPipeline.from_workspace(models, conditions)
    scores = {c: {"consistency": 0.1, "fid_inception": 42.0} for c in conditions}
    pipe.save_pretrained(tmp_path / "dist", trained_on="Fashion-MNIST, 32 px", metrics=scores)
    index = json.loads((tmp_path / "dist/model_index.json").read_text())
    assert index["_class_name"] == "OneStepControlPipeline" and index["conditions"] == conditions
    assert index["controlnet"][1] == ("ControlNetModel" if len(conditions) == 1 else "MultiControlNetModel")
    card = (tmp_path / "dist/README.md").read_text()
    assert "library_name: diffusers" in card and "Fashion-MNIST, 32 px" in card and "| canny | 0.1 | 42 |" in card
    assert "OneStepControlPipeline.from_pretrained" in card
    loaded = OneStepControlPipeline.from_pretrained(tmp_path / "dist")
    controls = {c: torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)) for c in conditions}
    images = [p("a photo of a boot", controls, generator=torch.Generator().manual_seed(0), output_type="pt").images
              for p in (pipe, loaded)]
    assert torch.equal(*images)
    pil = loaded("a photo of a boot", controls, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].mode == "L" and pil[0].size == (16, 16)
    array = loaded("a photo of a boot", controls, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert array.shape == (1, 16, 16, 1) and np.allclose(array[0, ..., 0], images[0][0, 0].numpy(), atol=1e-6)
    assert loaded.to("cpu").device.type == "cpu"


def test_plugin_names_are_valid_module_keys(teacher):
    unet, noise_scheduler = teacher
    gen = OneStepGenerator(unet, {"pkg.mod:Cond": controlnet_from_unet(unet, 1, 1)},
                           VPSchedule.from_scheduler(noise_scheduler), 950)
    assert gen.controlnet("pkg.mod:Cond") is next(iter(gen.controlnets.values()))


def test_export_writes_a_folder_that_sample_reads(workspace, tmp_path, capsys):
    """`jdm export` makes the stages' folders one pipeline folder with the evaluation's scores in its card;
    `jdm sample --models` reads either layout and writes the same image; a non-empty --out is refused."""
    from PIL import Image

    from jdm.cli import main

    models, _, _ = workspace
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/jdm-hed.json").write_text(json.dumps({"consistency": 0.25, "latency_ms": 3.0}))
    export = ["--params", str(tmp_path / "none.yaml"), "export", "--condition", "canny", "--condition", "hed",
              "--models", str(models), "--metrics", str(tmp_path / "eval")]
    assert main([*export, "--out", str(tmp_path / "dist")]) == 0
    card = (tmp_path / "dist/README.md").read_text()
    assert "| hed | 0.25 |" in card and "latency_ms" not in card and "| canny |" not in card
    assert main([*export, "--out", str(tmp_path / "dist")]) == 2
    assert "is not empty" in capsys.readouterr().err
    Image.fromarray((np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)).save(tmp_path / "hed.png")
    for source, out in ((models, "a.png"), (tmp_path / "dist", "b.png")):
        assert main(["sample", "--condition", "hed", "--control", str(tmp_path / "hed.png"), "--prompt", "a boot",
                     "--out", str(tmp_path / out), "--models", str(source)]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_a_registered_controlnet_loads_as_an_mlflow_model(workspace, tmp_path, monkeypatch):
    """register_controlnet logs the pipeline as a pyfunc into the training run and registers it: the
    model loads by its alias, has a signature, and draws the pipeline's own images; twice is one version."""
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    from jdm.serving import register_controlnet
    from jdm.tracking import stage_run

    models, _, _ = workspace
    (tmp_path / ".dvc").mkdir()  # the repository root, where the embedded MLflow store lives
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with stage_run("extend", "smoke", {"extend": {"steps": 3}}, condition="hed", workspace=tmp_path) as run:
        run.log_metrics({"consistency": 0.2, "fid_classifier": 1.5, "steps": 3})
    assert "MLFLOW_TRACKING_URI" not in os.environ  # a stage run leaves the process's environment as it found it
    assert register_controlnet("hed", tmp_path) == ("jdm-controlnet-hed", "1")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the stages this process starts next record where they would have
    assert register_controlnet("hed", tmp_path) == ("jdm-controlnet-hed", "1")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # `newest` follows every new version; `champion` only one no worse on the validation scores
    client = mlflow.MlflowClient()
    for version, (consistency, fid) in ((2, (0.3, 2.0)), (3, (0.1, 1.0))):
        with stage_run("extend", "smoke", {}, condition="hed", workspace=tmp_path) as run:
            run.log_metrics({"consistency": consistency, "fid_classifier": fid})
        assert register_controlnet("hed", tmp_path) == ("jdm-controlnet-hed", str(version))
        aliases = client.get_registered_model("jdm-controlnet-hed").aliases
        assert (aliases["newest"], aliases["champion"]) == (version, 1 if version == 2 else 3), aliases
    model = mlflow.pyfunc.load_model("models:/jdm-controlnet-hed@newest")
    assert model.metadata.signature.inputs.input_names() == ["prompt", "control"]
    assert len(model.predict(model.input_example)["image"]) == 1  # a blank map of the ControlNet's size
    control = (np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(control).save(png, format="PNG")
    out = model.predict(pd.DataFrame({"prompt": ["a boot", "a bag"], "control": [png.getvalue()] * 2}), params={"seed": 3})
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in out["image"]]
    expected = OneStepControlPipeline.from_workspace(models, ["hed"])(
        ["a boot", "a bag"], {"hed": torch.from_numpy(control / 255).float()[None, None].expand(2, 1, 16, 16)},
        generator=torch.Generator().manual_seed(3), output_type="np").images
    assert all(np.array_equal(a, (e[..., 0] * 255).round().astype(np.uint8)) for a, e in zip(images, expected))
