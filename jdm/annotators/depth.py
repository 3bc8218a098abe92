"""The depth stand-in: `DepthNet`, a small conv encoder-decoder in place of MiDaS on the small profiles
(32x32 and 16x16 grayscale), its training, metrics, and save/load.

MiDaS weights cannot be downloaded here, so `train_depth_net` trains the stand-in from scratch on
procedurally rendered scenes whose depth is exact (jdm/annotators/scenes.py). The real MiDaS, for the
paper-scale profile, is jdm/annotators/midas.py.

Convention (both annotators, and the rendered targets): MiDaS-like relative inverse depth (disparity)
normalised per image to [0, 1], 1 = nearest, 0 = farthest (`jdm.annotators.normalize_per_image`).
Maps are [N, 1, H, W].
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from jdm.annotators import normalize_per_image
from jdm.annotators.scenes import draw_scenes, near_far_scenes, render_scenes, sample_scenes
from jdm.io import load_tensors, save_tensors, write_json

DEPTH_FILE = "depth.safetensors"
CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------

def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    # GroupNorm, not BatchNorm: train and eval behave the same, and a batch of one is fine
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU()]


class DepthNet(nn.Module):
    """A small U-Net, the MiDaS stand-in: images [N, 1 or 3, H, W] in [0, 1] -> disparity [N, 1, H, W] in [0, 1].

    H and W must be multiples of 2**(len(channels) - 1) (8 by default). Three-channel input is averaged
    to gray. The output is a sigmoid, 1 = near, trained to match per-image normalised disparity.
    The full-resolution level has one conv on each side, the lower levels two: on CPU the full-resolution
    convs dominate the cost, while depth needs the context of the coarse levels.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 48, 64)):
        super().__init__()
        self.channels = c = tuple(int(x) for x in channels)
        self.stem = nn.Sequential(*_conv(1, c[0]))
        self.down = nn.ModuleList(nn.Sequential(*_conv(c[i], c[i + 1]), *_conv(c[i + 1], c[i + 1]))
                                  for i in range(len(c) - 1))
        self.up = nn.ModuleList(nn.Sequential(*_conv(c[i + 1] + c[i], c[i]), *_conv(c[i], c[i]))
                                for i in reversed(range(1, len(c) - 1)))
        self.head = nn.Sequential(*_conv(c[1] + c[0], c[0]), nn.Conv2d(c[0], 1, 1))

    @property
    def config(self) -> dict:
        return {"channels": list(self.channels)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
        factor = 2 ** (len(self.channels) - 1)
        if images.shape[-2] % factor or images.shape[-1] % factor:
            raise ValueError(f"H and W must be multiples of {factor}, got {tuple(images.shape[-2:])}")
        x = images.mean(dim=1, keepdim=True) * 2 - 1
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.avg_pool2d(skips[-1], 2)))
        x = skips.pop()
        for block in (*self.up, self.head):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = block(torch.cat([x, skips.pop()], dim=1))
        return torch.sigmoid(x)


# --------------------------------------------------------------------------------------------------
# Metrics and training
# --------------------------------------------------------------------------------------------------

def _align_scale_shift(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image least-squares s, t minimising |s * pred + t - target|^2 (MiDaS's alignment)."""
    p, q = pred.flatten(1), target.flatten(1)
    p_mean, q_mean = p.mean(1, keepdim=True), q.mean(1, keepdim=True)
    var = ((p - p_mean) ** 2).mean(1, keepdim=True)
    scale = ((p - p_mean) * (q - q_mean)).mean(1, keepdim=True) / var.clamp_min(1e-8)
    return (scale * (p - p_mean) + q_mean).view_as(pred)


def ordering_accuracy(pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator, pairs: int = 1000,
                      margin: float = 0.1, surface_id: torch.Tensor | None = None) -> float:
    """Fraction of random same-image pixel pairs whose target differs by more than `margin` that the
    prediction orders right. With `surface_id`, only pairs on two different objects count."""
    n = pred.shape[0]
    p, t = pred.flatten(1), target.flatten(1)
    i = torch.randint(0, p.shape[1], (n, pairs), generator=generator)
    j = torch.randint(0, p.shape[1], (n, pairs), generator=generator)
    dt = t.gather(1, i) - t.gather(1, j)
    dp = p.gather(1, i) - p.gather(1, j)
    counted = dt.abs() > margin
    if surface_id is not None:
        s = surface_id.flatten(1)
        si, sj = s.gather(1, i), s.gather(1, j)
        counted &= (si > 0) & (sj > 0) & (si != sj)
    return ((torch.sign(dp) == torch.sign(dt)) & counted).sum().item() / max(counted.sum().item(), 1)


def near_far_accuracy(pred: torch.Tensor, surface_id: torch.Tensor) -> float:
    """Over `near_far_scenes` where both objects show: the fraction whose near object (surface 1) has the
    higher mean predicted disparity than the far one (surface 2)."""
    near, far = surface_id == 1, surface_id == 2
    both = (near.sum((1, 2, 3)) > 0) & (far.sum((1, 2, 3)) > 0)
    mean = lambda m: (pred * m).sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp(min=1)  # noqa: E731
    return (mean(near) > mean(far))[both].float().mean().item()


@torch.no_grad()
def evaluate_depth_net(model: nn.Module, n: int, size: int, seed: int, device: str | torch.device = "cpu") -> dict:
    """Metrics on `n` fresh renders from `seed` (and `n` `near_far_scenes`).

    ordering_accuracy: any pixel pairs (`ordering_accuracy`); object_ordering_accuracy: pixel pairs on two
    different objects, the harder case (ground and wall give themselves away by their position);
    near_far_accuracy: whole objects, one near and one far (`near_far_accuracy`).
    l1: mean |pred - target| on normalised disparity. abs_rel: MiDaS's metric -- the prediction aligned to
    the true disparity 1/z in scale and shift per image, turned into depth, mean |z_pred - z| / z.
    """
    g = torch.Generator().manual_seed(seed)
    images, z, surface_id = draw_scenes(sample_scenes(n, g), size, g)
    nf_images, _, nf_surface = draw_scenes(near_far_scenes(n, g), size, g)
    target = normalize_per_image(1 / z)
    was_training = model.training
    model.eval()
    pred = model(images.to(device)).float().cpu()
    nf_pred = model(nf_images.to(device)).float().cpu()
    model.train(was_training)
    disparity = _align_scale_shift(pred, 1 / z).clamp_min(1 / z.amax())  # no negative or infinite depth
    return {
        "ordering_accuracy": ordering_accuracy(pred, target, g),
        "object_ordering_accuracy": ordering_accuracy(pred, target, g, pairs=4000, surface_id=surface_id),
        "near_far_accuracy": near_far_accuracy(nf_pred, nf_surface),
        "l1": (pred - target).abs().mean().item(),
        "abs_rel": ((1 / disparity - z).abs() / z).mean().item(),
    }


def depth_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """`l1` on normalised disparity, or MiDaS's scale-and-shift-invariant `ssi` (L1 after alignment)."""
    if kind == "l1":
        return (pred - target).abs().mean()
    if kind == "ssi":
        return (_align_scale_shift(pred, target) - target).abs().mean()
    raise ValueError(f"unknown depth loss {kind!r}: use 'l1' or 'ssi'")


def train_depth_net(steps: int, batch_size: int, lr: float, size: int, seed: int,
                    log: Callable[[int, dict], None] | None = None, *, loss: str = "l1",
                    channels: tuple[int, ...] = (16, 32, 48, 64), eval_n: int = 256,
                    device: str | torch.device = "cpu") -> tuple[DepthNet, dict]:
    """Train the MiDaS stand-in on freshly rendered scenes every step (no scene is seen twice).

    Returns the model (eval mode) and held-out metrics (`evaluate_depth_net`) on renders from a seed no
    training batch uses, plus `seconds`. `log(step, {"loss": ...})` is called about every 10% of steps
    (the mean loss since the previous call) and after the last step.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's global RNG alone
        torch.manual_seed(seed)
        model = DepthNet(channels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # cosine decay: the last steps refine at a small rate instead of bouncing at the peak one
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0))))
    every = max(steps // 10, 1)
    start, running, count = time.perf_counter(), 0.0, 0
    model.train()
    for step in range(1, steps + 1):
        images, target = render_scenes(batch_size, size, g)
        value = depth_loss(model(images.to(device)), target.to(device), loss)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        running, count = running + value.item(), count + 1
        if log is not None and (step % every == 0 or step == steps):
            log(step, {"loss": running / count, "lr": sched.get_last_lr()[0]})
            running, count = 0.0, 0
    seconds = time.perf_counter() - start
    # held-out renders: a seed derived so it never coincides with the training stream's generator
    metrics = evaluate_depth_net(model, eval_n, size, seed + 1_000_003, device)
    metrics["seconds"] = seconds
    model.eval()
    return model, metrics


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------

def save_depth_net(model: DepthNet, out_dir: str | os.PathLike) -> None:
    """`out_dir/depth.safetensors` (weights) and `out_dir/config.json` (architecture args)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir / DEPTH_FILE)
    write_json({"kind": "DepthNet", **model.config}, out_dir / CONFIG_FILE)


def load_depth_net(out_dir: str | os.PathLike) -> DepthNet:
    """The saved DepthNet, in eval mode with frozen parameters."""
    out_dir = Path(out_dir)
    config_path = out_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: expected {CONFIG_FILE} and {DEPTH_FILE} "
                                f"in {out_dir} (written by save_depth_net)")
    config = json.loads(config_path.read_text())
    model = DepthNet(tuple(config["channels"]))
    model.load_state_dict(load_tensors(out_dir / DEPTH_FILE))
    model.eval().requires_grad_(False)
    return model
