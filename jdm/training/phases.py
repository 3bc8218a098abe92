"""The two-phase warm-up (Sec. 3.2.1) on UNets: players built from the teacher, bound to data.

Phase 1 (warm-up): generator UNet and the primary condition's ControlNet trained jointly.
Phase 2 (extension): the generator UNet frozen; only a new ControlNet trained, same objective.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..conditions import Condition
from ..data import EMPTY_PROMPT_ID
from ..models.backbone import Backbone
from ..models.generator import OneStepGenerator, controlnet_from_unet
from ..models.lora import add_consistency_lora
from ..objectives import VPSchedule
from .jdm import Players

# LCM-LoRA's targets: attention projections and the convolutions, where a small UNet keeps its capacity
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"]


@dataclass
class ControlData:
    """What the generator is conditioned on: prompt ids with their embeddings, and control maps drawn
    from p(c) (maps of real images, with the prompt of the image they came from)."""

    maps: torch.Tensor          # [M,C,H,W] in [0,1]
    prompt_ids: torch.Tensor    # [M]
    hidden: torch.Tensor        # [P,L,D]
    mask: torch.Tensor          # [P,L]


def build_generator(teacher_unet, schedule: VPSchedule, condition: Condition, backbone: Backbone, t_gen: int,
                    unet=None) -> OneStepGenerator:
    """Phase 1: a fresh copy of the teacher UNet; phase 2: the given (frozen) generator UNet."""
    unet = copy.deepcopy(teacher_unet).requires_grad_(True) if unet is None else unet
    controlnet = controlnet_from_unet(unet, condition.channels, backbone.factor)
    return OneStepGenerator(unet, {condition.name: controlnet}, schedule, t_gen)


def build_fake_score(teacher_unet, lora_rank: int):
    fake = copy.deepcopy(teacher_unet).requires_grad_(True)
    lora = add_consistency_lora(fake, lora_rank, LORA_TARGETS)
    return fake, lora


def unet_players(generator: OneStepGenerator, teacher_unet, fake_score, condition: Condition, data: ControlData,
                 backbone: Backbone, rng: torch.Generator, prompt_dropout: float = 0.0) -> Players:
    """Bind prompts and controls: the generator and the condition see the control, the teacher and
    the fake score see only the prompt (method.md: the teacher never needs to understand c)."""
    name = condition.name
    size = data.maps.shape[-1] // backbone.factor

    def sample(n: int, grad: bool):
        idx = torch.randint(len(data.maps), (n,), generator=rng)
        pid = data.prompt_ids[idx]
        if prompt_dropout:
            pid = torch.where(torch.rand(n, generator=rng) < prompt_dropout, EMPTY_PROMPT_ID, pid)
        ctx = {"hidden": data.hidden[pid], "mask": data.mask[pid], "control": data.maps[idx]}
        z = torch.randn((n, backbone.channels, size, size), generator=rng)
        with torch.set_grad_enabled(grad):
            return generator(z, ctx["hidden"], ctx["mask"], {name: ctx["control"]}), ctx

    def eps_of(unet):
        return lambda x_t, t, ctx: unet(x_t, t, encoder_hidden_states=ctx["hidden"],
                                        encoder_attention_mask=ctx["mask"]).sample

    return Players(sample=sample, real_eps=eps_of(teacher_unet), fake_eps=eps_of(fake_score), fake_score=fake_score,
                   log_likelihood=lambda x0, ctx: condition.log_likelihood(backbone.decode_differentiable(x0), ctx["control"]))
