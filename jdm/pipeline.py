"""The one-step controllable generator as users load it: a shared UNet and one ControlNet per condition.

On disk (diffusers' layout, safetensors):

    models/jdm/generator/        unet/, scheduler/, controlnet/ (the primary condition's, from the
                                 warm-up), jdm.json (t_gen, image size, text encoder, backbone)
    models/jdm/controlnet-<c>/   ControlNetModel.save_pretrained + condition.json (name, channels),
                                 one per condition added by the extension phase

    pipe = OneStepControlPipeline.from_pretrained("models/jdm/generator",
                                                  controlnets={"hed": "models/jdm/controlnet-hed"})
    images = pipe(["a photo of an ankle boot"], {"hed": hed_maps})   # NFE 1
    images = pipe(["a photo of a sneaker"], {"canny": canny_maps, "hed": hed_maps})  # several controls
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

from .conditions import condition_slug
from .errors import UserError
from .io import write_json
from .models.backbone import Backbone
from .models.generator import OneStepGenerator
from .objectives import VPSchedule

GENERATOR_CONFIG = "jdm.json"
CONDITION_CONFIG = "condition.json"


def save_generator(generator: OneStepGenerator, noise_scheduler: DDPMScheduler, out_dir: Path, meta: dict) -> None:
    """The shared UNet, its primary ControlNet, the teacher's noise schedule and what sampling needs besides."""
    generator.unet.save_pretrained(out_dir / "unet")
    noise_scheduler.save_pretrained(out_dir / "scheduler")
    for name in generator.names:
        save_controlnet(generator.controlnet(name), name, out_dir / "controlnet")  # the warm-up trains exactly one
    write_json({"t_gen": generator.t_gen, **meta}, out_dir / GENERATOR_CONFIG)


def save_controlnet(controlnet: ControlNetModel, condition_name: str, out_dir: Path) -> None:
    controlnet.save_pretrained(out_dir)
    write_json({"condition": condition_name, "channels": controlnet.config.conditioning_channels},
               out_dir / CONDITION_CONFIG)


def load_controlnet(path: str | Path) -> tuple[str, ControlNetModel]:
    path = Path(path)
    if not (path / CONDITION_CONFIG).is_file():
        raise FileNotFoundError(f"no JDM ControlNet at {path}: train it with `dvc repro extend@<condition>`")
    name = json.loads((path / CONDITION_CONFIG).read_text())["condition"]
    return name, ControlNetModel.from_pretrained(path).eval().requires_grad_(False)


def load_generator(generator_dir: str | Path, controlnets: dict[str, str | Path] | None = None,
                   primary: bool = True) -> tuple[OneStepGenerator, DDPMScheduler, dict]:
    """The shared UNet, its primary ControlNet (unless `primary=False`) and the given extra ControlNets."""
    generator_dir = Path(generator_dir)
    if not (generator_dir / GENERATOR_CONFIG).is_file():
        raise FileNotFoundError(f"no JDM generator at {generator_dir}: run the `warmup` stage first (`dvc repro warmup`)")
    meta = _loaded(generator_dir, lambda: json.loads((generator_dir / GENERATOR_CONFIG).read_text()))
    unet = _loaded(generator_dir / "unet", lambda: UNet2DConditionModel.from_pretrained(generator_dir, subfolder="unet"))
    unet.eval().requires_grad_(False)
    noise_scheduler = _loaded(generator_dir / "scheduler",
                              lambda: DDPMScheduler.from_pretrained(generator_dir, subfolder="scheduler"))
    nets = {}
    if primary and (generator_dir / "controlnet").is_dir():
        name, net = _loaded(generator_dir / "controlnet", lambda: load_controlnet(generator_dir / "controlnet"))
        nets[name] = net
    for name, path in (controlnets or {}).items():
        saved_name, nets[name] = _loaded(Path(path), lambda: load_controlnet(path))
        if saved_name != name:
            raise UserError(f"ControlNet at {path} was trained for condition {saved_name!r}, not {name!r}")
    generator = OneStepGenerator(unet, nets, VPSchedule.from_scheduler(noise_scheduler), meta["t_gen"])
    return generator, noise_scheduler, meta


def _loaded(folder: Path, load):
    """`load()`, with a damaged or missing file (truncated weights, bad JSON) reported as the folder it
    is in and how to get it back, instead of a loader's traceback."""
    from safetensors import SafetensorError

    try:
        return load()
    except UserError:
        raise
    except (OSError, ValueError, SafetensorError) as err:  # JSONDecodeError is a ValueError
        raise UserError(f"{folder} cannot be loaded ({str(err).strip().splitlines()[0]}); restore it with "
                        f"`dvc checkout` or retrain it with `dvc repro`") from None


class OneStepControlPipeline:
    """Prompts and control maps in, images in [0,1] out, one network evaluation (plus one per ControlNet)."""

    def __init__(self, generator: OneStepGenerator, text_encoder, backbone: Backbone, image_size: int):
        self.generator, self.text_encoder, self.backbone, self.image_size = generator, text_encoder, backbone, image_size

    @classmethod
    def from_pretrained(cls, generator_dir: str | Path, controlnets: dict[str, str | Path] | None = None
                        ) -> "OneStepControlPipeline":
        from .config import TextEncoderParams
        from .text import TextEncoder

        generator, _, meta = load_generator(generator_dir, controlnets)
        vae = None
        if meta.get("vae"):
            from diffusers import AutoencoderKL
            vae = AutoencoderKL.from_pretrained(meta["vae"], subfolder="vae")
        backbone = Backbone(meta["image_channels"], vae)
        return cls(generator, TextEncoder(TextEncoderParams(**meta["text_encoder"])), backbone, meta["image_size"])

    @classmethod
    def from_workspace(cls, models_dir: str | Path, conditions: list[str]) -> "OneStepControlPipeline":
        """`models_dir/generator` plus `models_dir/controlnet-<c>` for each condition it does not carry itself."""
        models_dir = Path(models_dir)
        primary_file = models_dir / "generator" / "controlnet" / CONDITION_CONFIG
        primary = json.loads(primary_file.read_text())["condition"] if primary_file.is_file() else None
        extra = {c: models_dir / f"controlnet-{condition_slug(c)}" for c in dict.fromkeys(conditions) if c != primary}
        for c, path in extra.items():
            if not path.is_dir():
                raise UserError(f"no ControlNet for condition {c!r} at {path}: train it with `dvc repro extend@{c}`"
                                + (f" (the generator's own ControlNet is {primary!r})" if primary else ""))
        return cls.from_pretrained(models_dir / "generator", extra)

    @property
    def conditions(self) -> list[str]:
        return list(self.generator.names)

    def check_controls(self, controls: dict[str, torch.Tensor], n: int) -> None:
        if n == 0:
            raise UserError("no prompts given: pass at least one (the empty string is the unconditional prompt)")
        for name, c in controls.items():
            if name not in self.generator.names:
                raise UserError(f"no ControlNet loaded for condition {name!r}; loaded: {', '.join(self.conditions) or 'none'}")
            want = (n, self.generator.controlnet(name).config.conditioning_channels, self.image_size, self.image_size)
            if tuple(c.shape) != want:
                raise UserError(f"control map for {name!r} must have shape {list(want)} ([N, channels, H, W] in [0,1]), "
                                f"got {list(c.shape)}")
            if not c.is_floating_point():
                raise UserError(f"control map for {name!r} must be a float tensor in [0,1], got dtype {c.dtype} "
                                f"(divide 8-bit images by 255)")
            low, high = c.min().item(), c.max().item()
            if low < 0 or high > 1:
                raise UserError(f"control map for {name!r} must lie in [0,1], got values in [{low:.4g}, {high:.4g}]")

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], controls: dict[str, torch.Tensor] | None = None, *,
                 scales: dict[str, float] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)  # one prompt, as diffusers' pipelines take
        controls = controls or {}
        self.check_controls(controls, len(prompts))
        hidden, mask = self.text_encoder.encode(prompts)
        size = self.image_size // self.backbone.factor
        z = torch.randn((len(prompts), self.backbone.channels, size, size), generator=generator)
        return self.backbone.decode(self.generator(z, hidden, mask, controls, scales))
