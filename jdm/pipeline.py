"""The one-step controllable generator as users load it: a diffusers `DiffusionPipeline` over the
generator UNet, one ControlNet per condition (several as diffusers' `MultiControlNetModel`), the
teacher's noise schedule, the text encoder and, in latent space, the VAE.

Two layouts on disk:

    dist/jdm/                    one self-contained folder (`pipe.save_pretrained`, `jdm export`):
                                 model_index.json, unet/, controlnet/ [controlnet_1/ ...], scheduler/,
                                 text_encoder/, tokenizer/, [vae/], README.md (the model card)
    models/jdm/generator/        what the training stages write (DVC outputs): unet/, scheduler/,
                                 controlnet/ (the warm-up's condition), jdm.json (t_gen, image size,
                                 text encoder, backbone)
    models/jdm/controlnet-<c>/   ControlNetModel.save_pretrained + condition.json (name, channels),
                                 one per condition added by the extension phase

    pipe = OneStepControlPipeline.from_workspace("models/jdm", ["hed"])   # the stages' folders
    pipe.save_pretrained("dist/jdm")                                        # -> one folder
    pipe = OneStepControlPipeline.from_pretrained("dist/jdm").to("cuda")
    image = pipe("a photo of an ankle boot", {"hed": hed_map}).images[0]    # NFE 1, a PIL image
    pipe(["a photo of a sneaker"], {"canny": canny_map, "hed": hed_map}, output_type="pt")  # two controls
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, DDPMScheduler, DiffusionPipeline, MultiControlNetModel, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .conditions import condition_slug
from .errors import UserError
from .io import write_json
from .models.backbone import Backbone
from .models.generator import OneStepGenerator
from .objectives import VPSchedule
from .text import TextEncoder

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


@dataclass
class OneStepControlPipelineOutput(BaseOutput):
    """`images`: PIL images, a numpy array [N, H, W, C] or a tensor [N, C, H, W]; values in [0, 1]."""

    images: list | np.ndarray | torch.Tensor


class OneStepControlPipeline(DiffusionPipeline):
    """Prompts and control maps in, images out, one network evaluation (plus one per ControlNet used)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["controlnet", "vae"]

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDPMScheduler, text_encoder, tokenizer,
                 controlnet: ControlNetModel | MultiControlNetModel | list[ControlNetModel] | None = None,
                 vae=None, conditions: list[str] | None = None, t_gen: int = 950, max_length: int = 77):
        super().__init__()
        if isinstance(controlnet, (list, tuple)):
            controlnet = None if not controlnet else controlnet[0] if len(controlnet) == 1 else MultiControlNetModel(controlnet)
        conditions = list(conditions or [])
        if len(conditions) != len(_nets(controlnet)):
            raise ValueError(f"{len(_nets(controlnet))} ControlNet(s) but conditions {conditions}: name one per ControlNet")
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
                              controlnet=controlnet, vae=vae)
        self.register_to_config(conditions=conditions, t_gen=t_gen, max_length=max_length)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=False)

    @classmethod
    def from_workspace(cls, models_dir: str | Path, conditions: list[str]) -> "OneStepControlPipeline":
        """The training stages' folders: `models_dir/generator` plus `models_dir/controlnet-<c>` for each
        condition it does not carry itself (the layout DVC tracks; `save_pretrained` makes one folder of it)."""
        models_dir = Path(models_dir)
        primary_file = models_dir / "generator" / "controlnet" / CONDITION_CONFIG
        primary = json.loads(primary_file.read_text())["condition"] if primary_file.is_file() else None
        extra = {c: models_dir / f"controlnet-{condition_slug(c)}" for c in dict.fromkeys(conditions) if c != primary}
        for c, path in extra.items():
            if not path.is_dir():
                raise UserError(f"no ControlNet for condition {c!r} at {path}: train it with `dvc repro extend@{c}`"
                                + (f" (the generator's own ControlNet is {primary!r})" if primary else ""))
        from .config import TextEncoderParams

        generator, noise_scheduler, meta = load_generator(models_dir / "generator", extra)
        text = TextEncoder.from_params(TextEncoderParams(**meta["text_encoder"]))
        vae = None
        if meta.get("vae"):
            from diffusers import AutoencoderKL
            vae = AutoencoderKL.from_pretrained(meta["vae"], subfolder="vae")
        names = list(generator.names)
        return cls(generator.unet, noise_scheduler, text.model, text.tokenizer, [generator.controlnet(n) for n in names],
                   vae, conditions=names, t_gen=generator.t_gen, max_length=text.max_length)

    @property
    def conditions(self) -> list[str]:
        return list(self.config.conditions)

    @property
    def controlnets(self) -> dict[str, ControlNetModel]:
        """Condition name -> its ControlNet, in the order the conditions were registered."""
        return dict(zip(self.conditions, _nets(self.controlnet)))

    @property
    def backbone(self) -> Backbone:
        return Backbone(self.unet.config.in_channels, self.vae)

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.backbone.factor

    def one_step_generator(self) -> OneStepGenerator:
        """The registered modules as the generator the training stages built (no copy of any weight)."""
        return OneStepGenerator(self.unet, self.controlnets,
                                VPSchedule.from_scheduler(self.scheduler), self.config.t_gen)

    def check_controls(self, controls: dict[str, torch.Tensor], n: int) -> None:
        if n == 0:
            raise UserError("no prompts given: pass at least one (the empty string is the unconditional prompt)")
        nets = self.controlnets
        for name, c in controls.items():
            if name not in nets:
                raise UserError(f"no ControlNet loaded for condition {name!r}; loaded: {', '.join(self.conditions) or 'none'}")
            want = (n, nets[name].config.conditioning_channels, self.image_size, self.image_size)
            if not isinstance(c, torch.Tensor):
                raise UserError(f"control map for {name!r} must be a float tensor of shape {list(want)} in [0,1] "
                                f"or PIL images, got {type(c).__name__}")
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
    def __call__(self, prompt: str | list[str], controls: dict[str, torch.Tensor] | None = None, *,
                 controlnet_conditioning_scale: float | dict[str, float] = 1.0,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> OneStepControlPipelineOutput | tuple:
        """`controls` maps a condition to its maps: a float tensor [N, channels, H, W] in [0, 1], or PIL
        images (one, or a list of N). A scale per condition (or one for all) weighs each ControlNet's
        residuals. `output_type`: "pil", "np" or "pt"."""
        if output_type not in ("pil", "np", "pt"):
            raise UserError(f"output_type {output_type!r} is not one of: pil, np, pt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)  # one prompt, as diffusers' pipelines take
        controls = {name: self._control_batch(name, c) for name, c in (controls or {}).items()}
        self.check_controls(controls, len(prompts))
        scales = (controlnet_conditioning_scale if isinstance(controlnet_conditioning_scale, dict)
                  else dict.fromkeys(controls, float(controlnet_conditioning_scale)))
        device, dtype = self._execution_device, self.unet.dtype
        hidden, mask = TextEncoder(self.tokenizer, self.text_encoder, self.config.max_length).encode(prompts)
        backbone = self.backbone
        size = self.image_size // backbone.factor
        z = randn_tensor((len(prompts), backbone.channels, size, size), generator=generator, device=device, dtype=dtype)
        x = self.one_step_generator()(z, hidden.to(dtype), mask, {k: c.to(device, dtype) for k, c in controls.items()},
                                      scales)
        images = backbone.decode(x).float()
        if output_type != "pt":
            images = self.image_processor.postprocess(images, output_type=output_type,
                                                      do_denormalize=[False] * len(images))
        self.maybe_free_model_hooks()
        return OneStepControlPipelineOutput(images=images) if return_dict else (images,)

    def _control_batch(self, name: str, control):
        """PIL images (one, or a list) as the float tensor the ControlNet takes; anything else as given."""
        from PIL import Image

        channels = self.controlnets[name].config.conditioning_channels if name in self.controlnets else None
        images = [control] if isinstance(control, Image.Image) else control
        if isinstance(images, (list, tuple)) and images and all(isinstance(c, Image.Image) for c in images):
            return torch.cat([control_tensor(c, f"for {name!r}", channels) for c in images])
        return control

    def save_pretrained(self, save_directory: str | Path, *args, trained_on: str | None = None,
                        metrics: dict[str, dict[str, float]] | None = None, **kwargs) -> None:
        """diffusers' folder (model_index.json and one subfolder per module) plus a model card, README.md."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_model_card(self, Path(save_directory), trained_on, metrics)


def read_control(source, label: str | None = None, channels: int | None = None) -> torch.Tensor:
    """A control map image (a path, a file object or PNG/JPEG bytes) as [1, C, H, W] in [0,1] (`control_tensor`)."""
    from PIL import Image

    if label is None:
        label = "(bytes)" if isinstance(source, bytes) else repr(str(source))
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()  # a truncated file fails here, not inside the network
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"control map {label} is not a readable image ({err})") from None
    return control_tensor(image, label, channels)


IMAGE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # the channels an 8-bit image can hold


def control_tensor(image, label: str = "", channels: int | None = None) -> torch.Tensor:
    """A PIL image as [1, C, H, W] in [0,1], 8-bit or 16-bit grayscale (depth maps often are). With
    `channels` (the ControlNet's), converted to it as diffusers converts control images (1: L, 2: LA,
    3: RGB, 4: RGBA); without, grayscale -> 1 channel and anything else -> RGB."""
    if channels is not None and channels not in IMAGE_MODES:
        raise UserError(f"control map {label}: the ControlNet takes {channels} channels, more than an image holds "
                        f"(1-4); pass the maps as a float tensor [N, {channels}, H, W]")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        if channels not in (None, 1):
            raise UserError(f"control map {label} is 16-bit grayscale; the ControlNet takes {channels} channels")
        array = np.asarray(image, dtype=np.float64)
        if array.min() < 0 or array.max() > 65535:
            raise UserError(f"control map {label} has 32-bit values in [{array.min():.0f}, {array.max():.0f}]; "
                            f"allowed: 8-bit or 16-bit images")
        array = (array / 65535).astype(np.float32)
    elif image.mode in ("L", "RGB", "LA", "RGBA", "P", "PA", "1"):
        if channels:
            mode = IMAGE_MODES[channels]
        elif image.mode in ("L", "RGB"):
            mode = image.mode
        else:
            mode = "RGB" if len(image.getbands()) >= 3 else "L"
        image = image.convert(mode) if mode != image.mode else image
        array = np.asarray(image, dtype=np.float32) / 255
    else:
        raise UserError(f"control map {label} has pixel mode {image.mode}; allowed: 8-bit grayscale or RGB "
                        f"(L, RGB, RGBA, P) or 16-bit grayscale (I;16)")
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())[None]


def _nets(controlnet) -> list[ControlNetModel]:
    if controlnet is None:
        return []
    return list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]


def write_model_card(pipe: OneStepControlPipeline, folder: Path, trained_on: str | None,
                     metrics: dict[str, dict[str, float]] | None) -> None:
    """README.md in the Hugging Face model card format: what the model is, what it was trained on, its
    held-out scores (one row per condition) and how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image",
                         tags=["jdm", "controlnet", "one-step", "score-distillation", *pipe.conditions])
    conditions = ", ".join(pipe.conditions) or "none (text only)"
    lines = ["# One-step controllable generator (Joint Distribution Matching)", "",
             f"Prompt and control maps in, an image out in one network evaluation (plus one per ControlNet used). "
             f"Conditions: {conditions}. Image size {pipe.image_size} px; generator timestep t_gen = {pipe.config.t_gen}.",
             "", "## Trained on", "", trained_on or "Not recorded when this folder was saved.", "", "## Held-out scores", ""]
    if metrics:
        keys = sorted({k for row in metrics.values() for k in row})
        lines += ["| condition | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(f"{row[k]:.4g}" if k in row else "-" for k in keys) + " |"
                  for c, row in metrics.items()]
    else:
        lines.append("None recorded when this folder was saved.")
    last = pipe.conditions[-1] if pipe.conditions else None  # the newest ControlNet: what a registered model is for
    call = f'pipe("a photo of an ankle boot", {{"{last}": control_map}})' if last else 'pipe("a photo of an ankle boot")'
    lines += ["", "## How to load", "", "```python", "from jdm.pipeline import OneStepControlPipeline", "",
              f'pipe = OneStepControlPipeline.from_pretrained("{folder.name}")  # .to("cuda") on a GPU',
              f"image = {call}.images[0]  # control maps: float tensors [N, C, H, W] in [0, 1]", "```", ""]
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).save(folder / "README.md")
