"""The networks of a profile, randomly initialised: timings depend on shapes, not on weights, so the
benchmarks run anywhere (CI, a GPU worker without the workspace) on exactly the profile's backbone.

`sd15` loads a pretrained pipeline in the stages; here it is SD 1.5's shapes with random weights
(diffusers' UNet2DConditionModel defaults are SD 1.5's UNet, at 768-d CLIP text states; its
AutoencoderKL at SD's widths), so a GPU worker times the paper's setting without any download.
`width_divisor` shrinks every width of that shape, to run its code path on a CPU."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from jdm.conditions import load_condition
from jdm.config import Params
from jdm.profiles import profile_params
from jdm.models.backbone import Backbone
from jdm.models.unet import build_noise_scheduler, build_unet
from jdm.objectives import VPSchedule
from jdm.training.phases import ControlData

TEXT_DIM, TEXT_TOKENS = 384, 16   # all-MiniLM-L6-v2 token states, text_encoder.max_length
SD15_TEXT_DIM = 768               # CLIP ViT-L/14 token states (text_encoder.max_length 77 in sd15)
SD15_UNET_WIDTHS, SD15_VAE_WIDTHS = (320, 640, 1280, 1280), (128, 256, 512, 512)
RESULTS = Path(__file__).parent / "results"


@dataclass
class ProfileNets:
    params: Params
    size: int
    teacher: torch.nn.Module
    noise_scheduler: object
    schedule: VPSchedule
    condition: object
    backbone: Backbone
    data: ControlData
    images: torch.Tensor

    def to(self, device) -> "ProfileNets":
        """The teacher, data and images on `device` (an accelerator's); new generators copy the teacher."""
        self.teacher.to(device)
        self.backbone.to(device)
        return replace(self, data=self.data.to(device), images=self.images.to(device))


def sd15_shaped(width_divisor: int = 1) -> tuple[torch.nn.Module, Backbone]:
    """SD 1.5's UNet (latent 4 channels, 64 x 64 at 512 px) and VAE backbone, randomly initialised."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    d = width_divisor
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=SD15_TEXT_DIM // d,
                                block_out_channels=tuple(w // d for w in SD15_UNET_WIDTHS),
                                norm_num_groups=32 // d if d > 1 else 32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=tuple(w // d for w in SD15_VAE_WIDTHS), norm_num_groups=32 // d if d > 1 else 32)
    return unet.eval().requires_grad_(False), Backbone(3, vae)


def profile_nets(profile: str, condition: str = "canny", num: int = 256, width_divisor: int = 1) -> ProfileNets:
    """`num` random images of the profile's size with their condition maps and prompt states, and its
    networks; `size` is the backbone's resolution (latents for sd15). `width_divisor`: sd15 only."""
    params = profile_params(profile, Path(__file__).parent.parent)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    image_size = params.data.image_size
    if params.teacher.unet is not None:
        backbone, text_dim, tokens, channels = Backbone(1), TEXT_DIM, TEXT_TOKENS, 1
        teacher = build_unet(params.teacher.unet, image_size, 1, TEXT_DIM).eval().requires_grad_(False)
    elif profile == "sd15":
        teacher, backbone = sd15_shaped(width_divisor)
        text_dim, tokens, channels = SD15_TEXT_DIM // width_divisor, params.text_encoder.max_length, 3
    else:
        raise SystemExit(f"profile {profile!r} loads a pretrained teacher ({params.teacher.pretrained}); the benchmarks "
                         "build the profile's UNet from teacher.unet (smoke, tiny) or SD 1.5's shapes (sd15)")
    noise_scheduler = build_noise_scheduler(params.teacher)
    images = torch.rand(num, channels, image_size, image_size, generator=g)
    cond = load_condition(condition, params)
    data = ControlData(cond.extract(images), torch.randint(1, 41, (num,), generator=g),
                       torch.randn(41, tokens, text_dim, generator=g), torch.ones(41, tokens, dtype=torch.long))
    return ProfileNets(params, image_size // backbone.factor, teacher, noise_scheduler,
                       VPSchedule.from_scheduler(noise_scheduler), cond, backbone, data, images)


def cpu_model() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> dict:
    """Where and when a result was measured: timings of one day and machine compare with each other only."""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def write_result(name: str, result: dict, directory: Path = RESULTS) -> Path:
    out = Path(directory) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
