"""The paper-scale loading code (`from_pretrained` on a local directory or hub id), tested on a local
directory in SD 1.5's layout holding small randomly initialised models."""

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from jdm.io import write_json
from jdm.models.teacher import build_backbone, load_teacher


def test_pretrained_teacher_and_vae_load_from_a_local_pipeline_dir(tmp_path, smoke_params):
    sd = tmp_path / "sd-tiny"
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                         norm_num_groups=8, cross_attention_dim=32).save_pretrained(sd / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(sd / "scheduler")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  norm_num_groups=8, layers_per_block=1).save_pretrained(sd / "vae")

    teacher_dir = tmp_path / "models" / "teacher"
    teacher_dir.mkdir(parents=True)
    write_json({"pretrained": str(sd)}, teacher_dir / "pretrained.json")  # what the teacher stage writes for sd15
    unet, scheduler = load_teacher(teacher_dir)
    assert unet.config.in_channels == 4 and scheduler.config.beta_schedule == "scaled_linear"
    assert not any(p.requires_grad for p in unet.parameters())

    params = smoke_params.model_copy(update={"teacher": smoke_params.teacher.model_copy(update={"pretrained": str(sd)})})
    backbone = build_backbone(params)
    assert backbone.factor == 8 and backbone.channels == 4
    pixels = torch.rand(2, 1, 64, 64)  # gray data into SD's RGB autoencoder
    latents = backbone.encode(pixels)
    assert latents.shape == (2, 4, 8, 8)
    assert backbone.decode(latents).shape == (2, 3, 64, 64)


def test_a_latent_space_pipeline_saves_and_loads_with_its_vae(tmp_path):
    """sd15's layout at toy size: the generator in SD's latent space (a VAE of factor 8), the pipeline
    decodes through the VAE, saves it in its folder and loads back drawing the same images."""
    from diffusers import DDPMScheduler

    from jdm.models.generator import OneStepGenerator, controlnet_from_unet
    from jdm.objectives import VPSchedule
    from jdm.pipeline import OneStepControlPipeline, save_controlnet, save_generator

    torch.manual_seed(0)
    sd = tmp_path / "sd-tiny"
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  norm_num_groups=8, layers_per_block=1).save_pretrained(sd / "vae")
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=384)  # MiniLM's width
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    canny, hed = controlnet_from_unet(unet, 1, 8), controlnet_from_unet(unet, 3, 8)
    models = tmp_path / "models/jdm"
    text = {"kind": "minilm", "path": None, "subfolder": None, "max_length": 8}
    save_generator(OneStepGenerator(unet, {"canny": canny}, VPSchedule.from_scheduler(scheduler), 950), scheduler,
                   models / "generator", {"image_size": 64, "image_channels": 3, "vae": str(sd), "text_encoder": text})
    save_controlnet(hed, "hed", models / "controlnet-hed")
    pipe = OneStepControlPipeline.from_workspace(models, ["hed"])
    assert pipe.image_size == 64 and pipe.vae is not None and pipe.backbone.factor == 8
    controls = {"canny": torch.rand(1, 1, 64, 64), "hed": torch.rand(1, 3, 64, 64)}
    draw = lambda p: p("a bag", controls, generator=torch.Generator().manual_seed(0), output_type="pt").images  # noqa: E731
    image = draw(pipe)
    assert image.shape == (1, 3, 64, 64)
    pipe.save_pretrained(tmp_path / "dist")
    assert (tmp_path / "dist/vae/config.json").is_file()
    assert torch.equal(draw(OneStepControlPipeline.from_pretrained(tmp_path / "dist")), image)
