"""Saving and loading the teacher, in diffusers' pipeline layout (`unet/`, `scheduler/`)."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DConditionModel

from ..config import Params
from .backbone import Backbone


def build_backbone(params: Params) -> Backbone:
    """Pixel space unless the teacher is a pretrained latent pipeline (SD 1.5: its VAE)."""
    if params.teacher.pretrained:
        from diffusers import AutoencoderKL
        return Backbone(3, AutoencoderKL.from_pretrained(params.teacher.pretrained, subfolder="vae"))
    return Backbone(params.data.channels)


def save_teacher(unet: UNet2DConditionModel, noise_scheduler: DDPMScheduler, out_dir: Path) -> None:
    unet.save_pretrained(out_dir / "unet")  # safetensors by default
    noise_scheduler.save_pretrained(out_dir / "scheduler")


def load_teacher(teacher_dir: str | Path) -> tuple[UNet2DConditionModel, DDPMScheduler]:
    """The teacher written by the `teacher` stage, or the pretrained pipeline it points to."""
    teacher_dir = Path(teacher_dir)
    pointer = teacher_dir / "pretrained.json"
    if pointer.is_file():
        root = json.loads(pointer.read_text())["pretrained"]
    elif (teacher_dir / "unet").is_dir():
        root = str(teacher_dir)
    else:
        raise FileNotFoundError(f"no teacher at {teacher_dir}: run the `teacher` stage first (`dvc repro teacher`)")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    return unet.eval().requires_grad_(False), noise_scheduler
