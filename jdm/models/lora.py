"""The consistency LoRA: a peft adapter over the fake score. Adapter on = consistency model,
adapter off = fake score; only the adapter is trained by the consistency loss."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER = "consistency"


def add_consistency_lora(model: torch.nn.Module, rank: int, target_modules: list[str],
                         alpha: int | None = None) -> list[torch.nn.Parameter]:
    """Inject a zero-initialised LoRA (peft), left switched off (the model is the fake score); return its parameters."""
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=target_modules, init_lora_weights=True)
    if hasattr(model, "add_adapter"):  # diffusers models
        model.add_adapter(config, adapter_name=ADAPTER)
    else:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = lora_parameters(model)
    for p in base_parameters(model):  # peft freezes the base; here it is the fake score, trained too
        p.requires_grad_(True)
    set_lora_enabled(model, False)
    return params


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def base_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" not in n]


def set_lora_enabled(model: torch.nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


@contextlib.contextmanager
def consistency_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The adapter on for the block (the consistency model), off again after (the fake score).

    peft also switches the adapter's requires_grad with it, so fake-score losses never reach the LoRA."""
    set_lora_enabled(model, True)
    try:
        yield model
    finally:
        set_lora_enabled(model, False)
