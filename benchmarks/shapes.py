"""The networks of a profile, randomly initialised: timings depend on shapes, not on weights, so the
benchmarks run anywhere (CI, a GPU worker without the workspace) on exactly the profile's backbone."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, replace
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
        return replace(self, data=self.data.to(device), images=self.images.to(device))


def profile_nets(profile: str, condition: str = "canny", num: int = 256) -> ProfileNets:
    params = profile_params(profile, Path(__file__).parent.parent)
    if params.teacher.unet is None:
        raise SystemExit(f"profile {profile!r} loads a pretrained teacher ({params.teacher.pretrained}); "
                         "the benchmarks build the profile's UNet from teacher.unet (smoke, tiny)")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    size = params.data.image_size
    teacher = build_unet(params.teacher.unet, size, 1, TEXT_DIM).eval().requires_grad_(False)
    noise_scheduler = build_noise_scheduler(params.teacher)
    images = torch.rand(num, 1, size, size, generator=g)
    cond = load_condition(condition, params)
    data = ControlData(cond.extract(images), torch.randint(1, 41, (num,), generator=g),
                       torch.randn(41, TEXT_TOKENS, TEXT_DIM, generator=g), torch.ones(41, TEXT_TOKENS, dtype=torch.long))
    return ProfileNets(params, size, teacher, noise_scheduler, VPSchedule.from_scheduler(noise_scheduler), cond,
                       Backbone(1), data, images)


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def write_result(name: str, result: dict, directory: Path = RESULTS) -> Path:
    out = Path(directory) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
