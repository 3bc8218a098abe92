"""The fake score `eps_psi` (tracks the student's distribution) and the consistency LoRA over it.

Saved as diffusers folders: `unet/` (the fake score itself, `save_pretrained`) and
`consistency_lora/` (the adapter, `save_lora_adapter`), so either loads without this package.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from diffusers import UNet2DConditionModel
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from .lora import ADAPTER, add_consistency_lora

if TYPE_CHECKING:
    import torch

# LCM-LoRA's targets: attention projections and the convolutions, where a small UNet keeps its capacity
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name for `save_lora_adapter` output


def build_fake_score(teacher_unet: UNet2DConditionModel, lora_rank: int
                     ) -> tuple[UNet2DConditionModel, list[torch.nn.Parameter]]:
    """A trainable copy of the teacher with a zero-initialised LoRA (switched off); returns (model, lora params)."""
    fake = copy.deepcopy(teacher_unet).requires_grad_(True)
    return fake, add_consistency_lora(fake, lora_rank, LORA_TARGETS)


def save_fake_score(fake: UNet2DConditionModel, out_dir: Path) -> None:
    # peft renames the wrapped layers (`to_q.base_layer.weight`): write the plain UNet's names
    plain = UNet2DConditionModel.from_config(fake.config)
    plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in fake.state_dict().items() if "lora_" not in k})
    plain.save_pretrained(out_dir / "unet")
    fake.save_lora_adapter(out_dir / "consistency_lora", adapter_name=ADAPTER)
    _sort_target_modules(out_dir / "consistency_lora" / LORA_WEIGHTS)


def _sort_target_modules(path: Path) -> None:
    """Make the file's bytes a function of the weights alone: peft writes `target_modules` from a set
    (its order follows Python's hash seed), and safetensors writes several metadata keys in a random
    order. The sorted LoRA config alone is kept (the `format: pt` tag is for transformers' loaders,
    which never read this file); otherwise every run gives another file, and DVC another hash."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)})


def load_fake_score(directory: str | Path, lora_rank: int) -> tuple[UNet2DConditionModel, list[torch.nn.Parameter]]:
    directory = Path(directory)
    if not (directory / "consistency_lora" / LORA_WEIGHTS).is_file():
        raise FileNotFoundError(f"no fake score at {directory}: run the `warmup` stage first (`dvc repro warmup`)")
    fake, lora = build_fake_score(UNet2DConditionModel.from_pretrained(directory, subfolder="unet"), lora_rank)
    result = set_peft_model_state_dict(fake, load_file(directory / "consistency_lora" / LORA_WEIGHTS), adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"consistency LoRA at {directory} does not fit the fake score: {result.unexpected_keys[:3]}")
    return fake, lora
