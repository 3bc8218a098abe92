"""The one-step generator G(z, y, c): a teacher-initialised UNet plus one ControlNet per condition.

x = (z - sigma_T eps_hat) / alpha_T at the fixed conditioning timestep t_gen (docs/method.md). The UNet is
shared by every control (phase 1 trains it, phase 2 freezes it); the ControlNets are per condition.
"""

from __future__ import annotations

import math

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from ..objectives import VPSchedule

# diffusers' default (SD: 8x down to 64x64 latents); one stride-2 conv per halving, none in pixel space
EMBEDDING_CHANNELS = (16, 32, 96, 256)


def controlnet_from_unet(unet: UNet2DConditionModel, condition_channels: int, backbone_factor: int) -> ControlNetModel:
    """A ControlNet copied from the UNet's encoder, zero convolutions out, whose conditioning
    embedding maps the pixel-space control map down by the backbone's factor (1 in pixel space)."""
    halvings = int(math.log2(backbone_factor))
    if 2 ** halvings != backbone_factor or halvings >= len(EMBEDDING_CHANNELS):
        raise ValueError(f"backbone factor {backbone_factor} must be a power of two up to {2 ** (len(EMBEDDING_CHANNELS) - 1)}")
    return ControlNetModel.from_unet(unet, conditioning_channels=condition_channels,
                                     conditioning_embedding_out_channels=EMBEDDING_CHANNELS[:halvings + 1])


def controlnet_residuals(controls: list[tuple[ControlNetModel, torch.Tensor, float]], x_t: torch.Tensor,
                         t: torch.Tensor, hidden: torch.Tensor) -> dict:
    """The UNet's extra inputs from several ControlNets, residuals summed (diffusers' multi-ControlNet);
    `controls` holds (ControlNet, map in [0,1], scale). Empty when there is no control."""
    down, mid = None, None
    for net, control, scale in controls:
        # diffusers' ControlNetModel takes no encoder_attention_mask: it attends to padding tokens too
        d, m = net(x_t, t, encoder_hidden_states=hidden, controlnet_cond=control, conditioning_scale=scale,
                   return_dict=False)
        down = list(d) if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    return {} if down is None else {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class OneStepGenerator(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel, controlnets: dict[str, ControlNetModel], schedule: VPSchedule,
                 t_gen: int):
        super().__init__()
        self.unet = unet
        # ModuleDict keys cannot hold '.', which plugin names ('pkg.mod:Cls') do
        self.names = {name: name.replace(".", "_").replace(":", "__") for name in controlnets}
        self.controlnets = torch.nn.ModuleDict({self.names[n]: net for n, net in controlnets.items()})
        self.schedule, self.t_gen = schedule, t_gen

    def controlnet(self, name: str) -> ControlNetModel:
        return self.controlnets[self.names[name]]

    def forward(self, z: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor,
                controls: dict[str, torch.Tensor] | None = None, scales: dict[str, float] | None = None) -> torch.Tensor:
        """One network evaluation; several controls add their residuals (multi-ControlNet)."""
        t = torch.full((z.shape[0],), self.t_gen, dtype=torch.long, device=z.device)
        residuals = controlnet_residuals([(self.controlnet(name), control, (scales or {}).get(name, 1.0))
                                          for name, control in (controls or {}).items()], z, t, hidden)
        eps = self.unet(z, t, encoder_hidden_states=hidden, encoder_attention_mask=mask, **residuals).sample
        return self.schedule.x0(z, eps, t)
