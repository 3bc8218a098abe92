"""The consistency LoRA: a peft adapter over the fake score. Adapter on = consistency model,
adapter off = fake score; only the adapter is trained by the consistency loss."""

from __future__ import annotations

import contextlib
import functools
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
def consistency_mode(model: torch.nn.Module, merged: bool = False) -> Iterator[torch.nn.Module]:
    """The adapter on for the block (the consistency model), off again after (the fake score).

    peft also switches the adapter's requires_grad with it, so fake-score losses never reach the LoRA.
    `merged`: the same consistency model, each adapted layer run once with its weight merged for the
    pass, W + s B A (differentiable in the LoRA), instead of peft's base layer plus two LoRA layers:
    fewer, larger kernels, the same function up to float rounding (tests/unit/test_jdm_unet.py)."""
    if not merged:
        set_lora_enabled(model, True)
        try:
            yield model
        finally:
            set_lora_enabled(model, False)
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:  # all checked before any is changed: a refusal leaves the model as it was
        _check_mergeable(layer)
    for layer in layers:
        layer.forward = functools.partial(_merged_forward, layer)  # shadows the class's forward for the block
    lora = lora_parameters(model)
    for p in lora:
        p.requires_grad_(True)  # as peft's switch would: the consistency loss's gradient reaches the LoRA
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward
        for p in lora:
            p.requires_grad_(False)


def _merged_forward(layer: BaseTunerLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = layer.get_base_layer()
    weight = base.weight + layer.get_delta_weight(ADAPTER)
    return torch.func.functional_call(base, {"weight": weight}, (x, *args), kwargs)


def _check_mergeable(layer: BaseTunerLayer) -> None:
    """Merging equals the adapter's own forward only for a plain LoRA: no dropout on its input, no variant
    (DoRA and the like)."""
    if not isinstance(layer.lora_dropout[ADAPTER], torch.nn.Identity) or ADAPTER in layer.lora_variant:
        raise ValueError(f"the consistency LoRA of a {type(layer.get_base_layer()).__name__} has dropout or a LoRA "
                         f"variant: a merged pass would compute another function; set acceleration.merge_lora: false")
