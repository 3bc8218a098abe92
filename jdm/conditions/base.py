"""The interface every condition implements."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import Params


class Condition:
    """A control signal `c = h(x)` of an image `x`.

    - `extract(images)`: the exact extractor, no gradient; builds training conditions and scores
      consistency. Images are [N,C,H,W] in [0,1]; maps are [N, channels, H, W] in [0,1] (same size as
      the image, so one ControlNet input shape serves every condition).
    - `surrogate(images)`: a differentiable stand-in for `extract` (itself, where it is differentiable).
    - `log_likelihood(x, c)`: differentiable `log p(c | x)` per sample, a Laplace likelihood
      `-||h(x) - c||_1 / tau` (docs/method.md), used for `grad log p(c | x_t)` in JDM. The norm is a sum
      over pixels, not a mean: the gradient per pixel then does not shrink as the resolution grows.
    """

    name: str = "condition"
    channels: int = 1
    tau: float = 0.05

    @classmethod
    def create(cls, params: Params | None, models_dir: Path) -> "Condition":
        return cls()

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def surrogate(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images)

    def log_likelihood(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return -(self.surrogate(x) - c).abs().flatten(1).sum(1) / self.tau

    def check_map(self, c: torch.Tensor, image_size: int) -> None:
        """Reject a control map of the wrong shape before it reaches a network."""
        want = (self.channels, image_size, image_size)
        if c.ndim != 4 or tuple(c.shape[1:]) != want:
            raise UserError(f"control map for {self.name!r} must be [N, {want[0]}, {want[1]}, {want[2]}], got {tuple(c.shape)}")
        if not c.is_floating_point():
            raise UserError(f"control map for {self.name!r} must be float in [0,1], got dtype {c.dtype}")
