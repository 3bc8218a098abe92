"""A classifier trained by the pipeline on the data's classes (Fashion-MNIST's; a folder's labels, else its
caption clusters, jdm/data.py): prompt accuracy and features for a fast local FID.

It stands in for CLIP score (no CLIP weights install offline): "does the sample show the class its
prompt names?". Its penultimate features give a FID that costs milliseconds instead of Inception's minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import load_tensors, save_tensors, write_json


class Classifier(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = 128):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(block(1, width), nn.AvgPool2d(2), block(width, 2 * width), nn.AvgPool2d(2),
                                  block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * width, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [0,1], [N,1|3,H,W]."""
        if images.shape[1] == 3:
            images = images.mean(1, keepdim=True)
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, eval_images: torch.Tensor, eval_labels: torch.Tensor,
                     *, num_classes: int = 10, steps: int, batch_size: int, lr: float, seed: int,
                     log: Callable[[int, dict], None] | None = None) -> tuple[Classifier, dict]:
    """Train on uint8 images [N,1|3,H,W]; return the model and its held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Classifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(labels), (batch_size,), generator=g)
        x = images[idx].float() / 255.0
        # horizontal flips keep every Fashion-MNIST class what it is
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % max(1, steps // 10) == 0 or step == steps):
            log(step, {"loss": loss.item()})
    model.eval().requires_grad_(False)
    return model, {"accuracy": accuracy(model, eval_images.float() / 255.0, eval_labels)}


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The class of each image, computed on the model's device, returned on the images' device."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).to(images.device)
                      for i in range(0, len(images), batch_size)])


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict(model, images) == labels).float().mean().item()


def save_classifier(model: Classifier, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    save_tensors(model.state_dict(), out_dir / "classifier.safetensors")
    write_json(model.config, out_dir / "config.json")


def load_classifier(out_dir: str | Path) -> Classifier:
    import json
    out_dir = Path(out_dir)
    cfg_path = out_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"classifier not found at {out_dir}: run the `classifier` stage first")
    model = Classifier(**json.loads(cfg_path.read_text()))
    model.load_state_dict(load_tensors(out_dir / "classifier.safetensors"))
    return model.eval().requires_grad_(False)
