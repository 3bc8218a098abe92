"""Rewards as conditions (human-feedback learning, Eq. 9): a differentiable `r(images, prompts)`.

`tiny` has no human preference data and no ImageReward weights offline, so the pipeline trains a
stand-in with the Bradley-Terry loss on preference pairs it can make honestly: a real Fashion-MNIST
image is preferred over a degraded copy of itself (blur, noise, speckle, lost contrast, blockiness:
the ways a briefly trained one-step generator fails). The stand-in scores "looks like a clean real
image"; it knows nothing of taste or of the prompt (it takes prompts only to share ImageReward's
interface). The paper stages `reward@train` and `reward@heldout` train two independently (another
seed, the other half of the train split, another width): the first gives the HFL gradient, the
second only scores, so reward hacking (a gain the training reward sees and the held-out one does
not) shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import load_tensors, save_tensors, write_json

DEGRADATIONS = ("blur", "noise", "speckle", "contrast", "blocky")


def degrade(x: torch.Tensor, g: torch.Generator, kind: torch.Tensor | None = None) -> torch.Tensor:
    """Each image in [0,1], [N,C,H,W], degraded by one of DEGRADATIONS (`kind`: indices; default at
    random) at a random strength."""
    from torchvision.transforms.functional import gaussian_blur

    n = len(x)
    kind = torch.randint(len(DEGRADATIONS), (n,), generator=g) if kind is None else kind
    strength = 0.3 + 0.7 * torch.rand(n, 1, 1, 1, generator=g)
    out = torch.empty_like(x)
    for k, name in enumerate(DEGRADATIONS):
        sel = kind == k
        if not sel.any():
            continue
        xs, s = x[sel], strength[sel]
        if name == "blur":
            y = gaussian_blur(xs, kernel_size=5, sigma=2.0) * s + xs * (1 - s)
        elif name == "noise":
            y = xs + 0.3 * s * torch.randn(xs.shape, generator=g)
        elif name == "speckle":
            y = torch.where(torch.rand(xs.shape, generator=g) < 0.15 * s, torch.rand(xs.shape, generator=g), xs)
        elif name == "contrast":
            mean = xs.mean(dim=(1, 2, 3), keepdim=True)
            y = mean + (xs - mean) * (1 - 0.8 * s)
        else:
            size = xs.shape[-1]
            y = F.interpolate(F.avg_pool2d(xs, 4), size=size, mode="nearest") * s + xs * (1 - s)
        out[sel] = y.clamp(0, 1)
    return out


class RewardNet(nn.Module):
    """A small CNN scoring images in [0,1] ([N,1|3,H,W], any size: resized to `image_size`)."""

    def __init__(self, width: int = 16, image_size: int = 32):
        super().__init__()
        self.config = {"width": width, "image_size": image_size}

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU())

        self.body = nn.Sequential(block(1, width), nn.AvgPool2d(2), block(width, 2 * width), nn.AvgPool2d(2),
                                  block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * width, 1))

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        x = images.mean(1, keepdim=True) if images.shape[1] == 3 else images
        size = self.config["image_size"]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return self.body(x * 2 - 1).squeeze(1)


def bradley_terry_loss(r_preferred: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_w - r_l): the preference likelihood of Bradley and Terry (ImageReward's loss)."""
    return -F.logsigmoid(r_preferred - r_rejected).mean()


def train_reward(images: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int, width: int,
                 log: Callable[[int, dict], None] | None = None) -> RewardNet:
    """Bradley-Terry on (real, degraded real) pairs from uint8 images [N,1,H,W]."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = RewardNet(width, images.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for step in range(1, steps + 1):
        x = images[torch.randint(len(images), (batch_size,), generator=g)].float() / 255
        loss = bradley_terry_loss(model(x), model(degrade(x, g)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % max(1, steps // 20) == 0 or step == steps):
            log(step, {"loss": loss.item()})
    return model.eval().requires_grad_(False)


@torch.no_grad()
def preference_accuracy(model: RewardNet, images: torch.Tensor, seed: int) -> dict[str, float]:
    """How often a real image (uint8) outscores its degraded copy: each degradation on every image."""
    g = torch.Generator().manual_seed(seed)
    x = images.float() / 255
    real = model(x)
    scores = {f"preference_accuracy_{name}": (real > model(degrade(x, g, torch.full((len(x),), k)))).float().mean().item()
              for k, name in enumerate(DEGRADATIONS)}
    scores["preference_accuracy"] = sum(scores.values()) / len(DEGRADATIONS)
    return scores


def save_reward(model: RewardNet, out_dir: Path, metrics: dict) -> None:
    save_tensors(model.state_dict(), out_dir / "reward.safetensors")
    write_json({**model.config, "metrics": metrics}, out_dir / "config.json")


def load_reward(directory: str | Path) -> RewardNet:
    import json

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no reward model at {directory} (config.json): save one with save_reward")
    config = json.loads(config_file.read_text())
    model = RewardNet(config["width"], config["image_size"])
    model.load_state_dict(load_tensors(directory / "reward.safetensors"))
    return model.eval().requires_grad_(False)
