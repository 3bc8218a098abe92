"""Multi-step sampling of a diffusion model with classifier-free guidance (diffusers schedulers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler

from .models.generator import controlnet_residuals
from .objectives import cfg_eps
from .progress import progress

if TYPE_CHECKING:
    from diffusers import ControlNetModel, UNet2DConditionModel

SAMPLERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler}


@torch.no_grad()
def sample_cfg(unet: UNet2DConditionModel, scheduler_config: dict[str, Any], hidden: torch.Tensor, mask: torch.Tensor,
               null_hidden: torch.Tensor, null_mask: torch.Tensor, *, shape: tuple[int, ...], steps: int,
               guidance_scale: float, sampler: str = "ddim", generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, controlnet: ControlNetModel | None = None,
               control: torch.Tensor | None = None, conditioning_scale: float = 1.0) -> torch.Tensor:
    """Backbone samples [N,*shape] from `noise` (else drawn from `generator`); conditional and
    unconditional halves share one batched pass.

    With `controlnet` and `control` ([N,C,H,W] in [0,1]) the ControlNet residuals are added to both halves.
    """
    scheduler = SAMPLERS[sampler].from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    n = hidden.shape[0]
    if noise is None:  # drawn on the CPU whatever the device, so a device changes no sample's noise
        noise = torch.randn((n, *shape), generator=generator)
    x = noise.to(hidden.device) * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    ctx = torch.cat([hidden, null_hidden.expand_as(hidden)]) if guided else hidden
    ctx_mask = torch.cat([mask, null_mask.expand_as(mask)]) if guided else mask
    ctrl = torch.cat([control, control]) if (guided and control is not None) else control
    for t in progress(scheduler.timesteps, f"{steps} denoising steps"):
        inp = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        residuals = controlnet_residuals([(controlnet, ctrl, conditioning_scale)] if controlnet is not None else [],
                                         inp, t, ctx)
        eps = unet(inp, t, encoder_hidden_states=ctx, encoder_attention_mask=ctx_mask, **residuals).sample
        if guided:
            eps = cfg_eps(*eps.chunk(2), guidance_scale)
        x = scheduler.step(eps, t, x).prev_sample
    return x
