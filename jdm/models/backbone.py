"""Where diffusion happens: pixels, or the latent space of an autoencoder, behind one interface.

Conditions and metrics always see pixels in [0,1]; the UNets see `encode(pixels)`.
"""

from __future__ import annotations

import torch


class Backbone(torch.nn.Module):
    """Pixel space when `vae` is None (tiny, smoke); SD's `AutoencoderKL` latents otherwise (sd15)."""

    def __init__(self, image_channels: int, vae=None):
        super().__init__()
        self.image_channels = image_channels
        self.vae = vae
        if vae is not None:
            vae.eval().requires_grad_(False)

    @property
    def channels(self) -> int:
        return self.vae.config.latent_channels if self.vae is not None else self.image_channels

    @property
    def factor(self) -> int:
        """Downsampling from pixels to the backbone (1 in pixel space, 8 for SD's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels * 2 - 1
        if self.vae is None:
            return x
        if x.shape[1] == 1:  # gray data into an RGB autoencoder
            x = x.expand(-1, 3, -1, -1)
        return self.vae.encode(x).latent_dist.sample() * self.vae.config.scaling_factor

    def decode_differentiable(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0,1] for a differentiable condition model: no clamp, so gradients never vanish."""
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return (x + 1) / 2

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_differentiable(x).clamp(0, 1)
