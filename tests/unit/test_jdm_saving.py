"""What the JDM stages write loads back to the same functions: generator + ControlNets as a one-step
pipeline, fake score + consistency LoRA, and checkpoints that refuse other settings."""

import pytest
import torch
from diffusers import DDPMScheduler

from jdm.errors import UserError
from jdm.models.backbone import Backbone
from jdm.models.fake_score import build_fake_score, load_fake_score, save_fake_score
from jdm.models.generator import OneStepGenerator, controlnet_from_unet
from jdm.models.lora import consistency_mode, lora_parameters
from jdm.models.unet import build_noise_scheduler, build_unet
from jdm.objectives import VPSchedule
from jdm.pipeline import OneStepControlPipeline, load_generator, save_controlnet, save_generator


@pytest.fixture
def teacher(smoke_params):
    torch.manual_seed(0)
    unet = build_unet(smoke_params.teacher.unet, 16, 1, 32).eval().requires_grad_(False)
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
    h, m = torch.randn(2, 4, 32), torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        for model_a, model_b in ((fake, loaded),):
            assert torch.allclose(model_a(x, t, h, encoder_attention_mask=m).sample,
                                  model_b(x, t, h, encoder_attention_mask=m).sample, atol=1e-6)
            with consistency_mode(model_a), consistency_mode(model_b):
                on_a = model_a(x, t, h, encoder_attention_mask=m).sample
                on_b = model_b(x, t, h, encoder_attention_mask=m).sample
            assert torch.allclose(on_a, on_b, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(fake), lora_parameters(loaded)))


class FixedText:
    def __init__(self, dim):
        self.dim = dim

    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts[0]))
        return torch.randn(len(prompts), 4, self.dim, generator=g), torch.ones(len(prompts), 4, dtype=torch.long)


def test_pipeline_loads_the_generator_with_several_controlnets(teacher, smoke_params, tmp_path):
    unet, noise_scheduler = teacher
    schedule = VPSchedule.from_scheduler(noise_scheduler)
    nets = {name: controlnet_from_unet(unet, 1, 1) for name in ("canny", "hed")}
    for net in nets.values():
        randomise(net)  # past the zero convolutions, so each control changes the output
    gen = OneStepGenerator(unet, {"canny": nets["canny"]}, schedule, t_gen=950)
    save_generator(gen, noise_scheduler, tmp_path / "generator", {"image_size": 16, "image_channels": 1})
    save_controlnet(nets["hed"], "hed", tmp_path / "controlnet-hed")
    loaded, sched, meta = load_generator(tmp_path / "generator", {"hed": tmp_path / "controlnet-hed"})
    assert sorted(loaded.names) == ["canny", "hed"] and meta["t_gen"] == 950
    assert isinstance(sched, DDPMScheduler)
    pipe = OneStepControlPipeline(loaded, FixedText(32), Backbone(1), 16)
    c = torch.rand(2, 1, 16, 16)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out_canny = pipe(["a", "b"], {"canny": c}, generator=g())
    out_both = pipe(["a", "b"], {"canny": c, "hed": c}, generator=g())
    assert out_canny.shape == (2, 1, 16, 16) and 0 <= out_canny.min() and out_canny.max() <= 1
    assert not torch.allclose(out_canny, out_both)
    # the same as the in-memory generator it was saved from
    hidden, mask = FixedText(32).encode(["a", "b"])
    z = torch.randn((2, 1, 16, 16), generator=g())
    with torch.no_grad():
        assert torch.allclose(out_canny, gen(z, hidden, mask, {"canny": c}).add(1).div(2).clamp(0, 1), atol=1e-5)
    with pytest.raises(UserError, match=r"\[2, 1, 16, 16\].*got \[2, 1, 8, 8\]"):
        pipe(["a", "b"], {"hed": torch.rand(2, 1, 8, 8)})
    with pytest.raises(UserError, match="no ControlNet loaded for condition 'depth'; loaded: canny, hed"):
        pipe(["a", "b"], {"depth": c})
    with pytest.raises(UserError, match="trained for condition 'hed', not 'depth'"):
        load_generator(tmp_path / "generator", {"depth": tmp_path / "controlnet-hed"})


def test_plugin_names_are_valid_module_keys(teacher):
    unet, noise_scheduler = teacher
    gen = OneStepGenerator(unet, {"pkg.mod:Cond": controlnet_from_unet(unet, 1, 1)},
                           VPSchedule.from_scheduler(noise_scheduler), 950)
    assert gen.controlnet("pkg.mod:Cond") is next(iter(gen.controlnets.values()))
