"""The paper's four controls (Appendix B): Canny, HED, depth, super-resolution (x8 nearest)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .base import Condition

if TYPE_CHECKING:
    from ..config import Params


def _gray(images: torch.Tensor) -> torch.Tensor:
    return images.mean(1, keepdim=True) if images.shape[1] == 3 else images


class Canny(Condition):
    """OpenCV's Canny (what controlnet-aux's CannyDetector runs; its 64-pixel resize rounding can't
    take 16-32 px images). Not differentiable, so `surrogate` is a soft Canny (below)."""

    name = "canny"

    def __init__(self, low_threshold: int = 100, high_threshold: int = 200):
        self.low, self.high = low_threshold, high_threshold

    @classmethod
    def create(cls, params: Params | None, models_dir: Path) -> "Canny":
        c = params.conditions.canny if params is not None else None
        return cls(c.low_threshold, c.high_threshold) if c else cls()

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        gray = (_gray(images).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        maps = np.stack([cv2.Canny(g[0], self.low, self.high) for g in gray])
        return torch.from_numpy(maps).float().div(255).unsqueeze(1)

    def surrogate(self, images: torch.Tensor) -> torch.Tensor:
        # cv2.Canny: 3x3 Sobel, L1 magnitude, no blur, non-maximum suppression, hysteresis. Here:
        # the same magnitude, a sigmoid between the thresholds, and a soft suppression of pixels
        # below their 3x3 neighbourhood's maximum (r = 0.83 with exact maps on Fashion-MNIST, 0.42 without)
        x = _gray(images) * 255
        sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device, dtype=x.dtype)
        kernels = torch.stack([sobel, sobel.T]).unsqueeze(1)
        magnitude = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels).abs().sum(1, keepdim=True)
        mid, width = (self.low + self.high) / 2, (self.high - self.low) / 4
        edge = torch.sigmoid((magnitude - mid) / width)
        local_max = F.max_pool2d(magnitude, 3, 1, 1)
        return edge * torch.sigmoid((magnitude - local_max) / (0.1 * local_max.clamp(min=1)) + 3)


class _NetworkCondition(Condition):
    """A condition whose extractor is a frozen network (differentiable, so surrogate = extract).

    Images are reflect-padded before the network and cropped after: both HED and the depth net
    zero-pad their convolutions, which on 16-32 px images paints a frame at the border.
    """

    pad = 8

    def __init__(self, network: torch.nn.Module):
        self.network = network

    @classmethod
    def create(cls, params: Params | None, models_dir: Path) -> "_NetworkCondition":
        """The annotator of `params.annotators.<name>`: controlnet-aux weights from its `path`, or
        the one the `annotator@<name>` stage wrote under `models_dir`."""
        p = getattr(params.annotators, cls.name) if params is not None else None
        if p is not None and p.source == "controlnet-aux":
            return cls(cls.load_network(p.source, p.path))
        return cls(cls.load_network("local", models_dir / "annotators" / cls.name))

    @staticmethod
    def load_network(source: str, path: str | Path) -> torch.nn.Module:
        raise NotImplementedError

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        p = min(self.pad, images.shape[-1] - 1, images.shape[-2] - 1)
        x = F.pad(images, (p, p, p, p), mode="reflect")
        # the network follows its input: the accelerator's device in training, the CPU when scoring
        return self.network.to(images.device)(x)[..., p:p + images.shape[-2], p:p + images.shape[-1]]

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._run(images).clamp(0, 1)

    def surrogate(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images)


class HED(_NetworkCondition):
    name = "hed"

    @staticmethod
    def load_network(source: str, path: str | Path) -> torch.nn.Module:
        from ..annotators.hed import load_controlnet_aux_hed, load_hed
        return load_controlnet_aux_hed(path) if source == "controlnet-aux" else load_hed(path)


class Depth(_NetworkCondition):
    name = "depth"
    pad = 0  # the stand-in was trained on whole frames: reflect padding doubled its L1 error

    @staticmethod
    def load_network(source: str, path: str | Path) -> torch.nn.Module:
        from ..annotators.depth import load_depth_net
        from ..annotators.midas import load_controlnet_aux_midas
        return load_controlnet_aux_midas(path) if source == "controlnet-aux" else load_depth_net(path)


class SuperResolution(Condition):
    """The image downscaled by `factor` with the nearest kernel (the paper's SRx8), shown at full
    size (nearest upscale) so every condition map has the image's shape. Nearest selection is
    differentiable with respect to the pixels it keeps."""

    name = "sr"
    tau = 0.05

    def __init__(self, factor: int = 8, channels: int = 1):
        self.factor = factor
        self.channels = channels  # the low-resolution image itself: as many channels as the images

    @classmethod
    def create(cls, params: Params | None, models_dir: Path) -> "SuperResolution":
        return cls(params.conditions.sr_factor, params.data.channels) if params is not None else cls()

    def surrogate(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        small = F.interpolate(images, size=(max(1, h // self.factor), max(1, w // self.factor)), mode="nearest")
        return F.interpolate(small, size=(h, w), mode="nearest")

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.surrogate(images)


BUILTIN: dict[str, type[Condition]] = {"canny": Canny, "hed": HED, "depth": Depth, "sr": SuperResolution}
