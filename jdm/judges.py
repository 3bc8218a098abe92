"""Held-out judges of consistency: networks (or plain image operators) that the student never trained
against.

JDM's condition term for hed and depth backpropagates through the same extractor `h` that the table's
consistency `|| h(x) - c ||_1` then scores, so a student could learn what that one network likes rather
than the structure of the control. A judge scores the same structure with something else: it looks at
the sample and at the real image the control map came from, and compares the two,
`|| j(x) - j(x_real) ||_1`. Canny and super-resolution have exact extractors (OpenCV, a nearest
downscale), so they need none.

- hed: an edge strength with no learned weights (Gaussian-smoothed Sobel magnitude, each image scaled
  to its own maximum), so it shares nothing with HED's VGG features.
- depth: a second depth stand-in trained like the conditions' one, from another seed and with other
  widths (the `judge` stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .config import Params


class Judge(Protocol):
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [0, 1] -> maps [N, 1, H, W] in [0, 1]."""


class EdgeJudge:
    """Sobel magnitude of the image blurred by a Gaussian of `sigma` pixels, divided by its own maximum."""

    def __init__(self, sigma: float = 1.0):
        radius = max(1, round(3 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        gauss = torch.exp(-x ** 2 / (2 * sigma ** 2))
        self.gauss = gauss / gauss.sum()
        sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        self.sobel = torch.stack([sobel, sobel.T]).unsqueeze(1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1)
        x = x.mean(1, keepdim=True) if x.shape[1] == 3 else x
        r = len(self.gauss) // 2
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), self.gauss.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), self.gauss.view(1, 1, -1, 1))
        gradient = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.sobel)
        magnitude = gradient.pow(2).sum(1, keepdim=True).sqrt()
        return magnitude / magnitude.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)


class NetworkJudge:
    """A frozen network that maps images to [0, 1] maps (the second depth stand-in)."""

    def __init__(self, network: torch.nn.Module):
        self.network = network.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images.float().clamp(0, 1)).clamp(0, 1)


def judge_path(models_dir: Path, condition: str) -> Path:
    return Path(models_dir) / "judges" / condition


def load_judge(condition: str, params: Params, models_dir: Path) -> Judge | None:
    """The held-out judge of `condition`, or None where the extractor is exact (canny, sr, plugins)."""
    if condition == "hed":
        return EdgeJudge(params.judges.hed.sigma)
    if condition == "depth":
        from .annotators.depth import load_depth_net
        return NetworkJudge(load_depth_net(judge_path(models_dir, "depth")))
    return None


def judged_consistency_per_sample(judge: Judge, images: torch.Tensor, real: torch.Tensor,
                                  batch_size: int = 256) -> torch.Tensor:
    """Per sample: mean L1 between the judge's maps of the sample and of the real image of its control map."""
    if images.shape[0] != real.shape[0]:
        raise ValueError(f"{images.shape[0]} samples but {real.shape[0]} real images")
    out = [(judge(images[i:i + batch_size]) - judge(real[i:i + batch_size])).abs().flatten(1).mean(1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)
