"""Monocular depth maps ("depth" controls) as torch modules.

Two sources:
- `DepthNet`: a small conv encoder-decoder, a stand-in for MiDaS on the small profiles (32x32 and 16x16
  grayscale). MiDaS weights cannot be downloaded here, so `train_depth_net` trains it from scratch on
  procedurally rendered scenes whose depth is exact (`render_scenes`).
- `load_controlnet_aux_midas`: the real MiDaS DPT-Hybrid (`dpt_hybrid-midas-501f0c75.pt`) through
  controlnet-aux's network class, for the paper-scale profile.

Convention (both sources, and the rendered targets): MiDaS-like relative inverse depth (disparity)
normalised per image to [0, 1], 1 = nearest, 0 = farthest. Maps are [N, 1, H, W].
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

from jdm.annotators import weights_file
from jdm.io import load_tensors, save_tensors, write_json

DEPTH_FILE = "depth.safetensors"
CONFIG_FILE = "config.json"
MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"

MAX_OBJECTS = 4
NEAR = 2.0  # nearest object distance; fog attenuation starts here


# --------------------------------------------------------------------------------------------------
# Procedural scenes with exact depth
# --------------------------------------------------------------------------------------------------

def _uniform(lo: float, hi: float, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def sample_scenes(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random scene parameters: per-scene tensors [n], per-object tensors [n, MAX_OBJECTS].

    A pinhole camera (focal length = image width) looks at a ground plane receding to a horizon and a
    far back wall; 1-4 objects stand on the ground. Every monocular cue follows the true geometry:
    nearer objects are lower in the frame (contact point v = horizon + camera height / z) and larger
    (size = world size / z), textures are finer with distance (patterns fixed in world units), the
    ground has a perspective checkerboard, objects are curved and Lambert-shaded and cast contact
    shadows, and fog darkens with distance (so, as in Fashion-MNIST, bright things on a dark ground
    read as near). Cue strengths are random per scene so that no single cue is a shortcut.
    """
    g = generator
    U = lambda lo, hi, *shape: _uniform(lo, hi, shape, g)  # noqa: E731
    k = MAX_OBJECTS
    # A quarter of the scenes show no ground (horizon at the bottom edge): objects before a plain wall,
    # like Fashion-MNIST
    horizon = torch.where(torch.rand(n, generator=g) < 0.25, torch.ones(n), U(0.05, 0.9, n))
    cam_height = U(0.5, 1.5, n)
    scene = {
        # background and camera [n]
        "horizon": horizon, "cam_height": cam_height, "z_wall": U(12.0, 20.0, n),
        "checker_side": U(0.5, 2.0, n), "ground_albedo": U(0.2, 0.8, n), "ground_contrast": U(0.0, 0.5, n),
        "wall_albedo": U(0.1, 0.8, n), "fog": U(0.0, 0.2, n),
        "gain": U(0.7, 1.3, n), "offset": U(-0.05, 0.05, n), "noise": U(0.0, 0.03, n),
        # objects [n, K]
        "active": torch.arange(k) < torch.randint(1, k + 1, (n, 1), generator=g),
        "z": U(NEAR, 11.0, n, k), "width": U(0.5, 2.0, n, k), "height": U(0.5, 2.5, n, k),  # world units
        "cx": U(0.1, 0.9, n, k),
        "kind": torch.randint(0, 3, (n, k), generator=g).float(),  # 0 rectangle, 1 ellipse, 2 T-shirt
        "bulge": U(0.0, 1.0, n, k),
        "light_x": U(-0.7, 0.7, n, k), "light_y": U(-0.7, 0.0, n, k),  # light from (x, y, 1), the camera side
        "stripe_angle": U(0.0, math.pi, n, k), "stripe_freq": U(0.3, 1.0, n, k),  # cycles per world unit
        "stripe_contrast": U(0.0, 0.3, n, k), "albedo": U(0.3, 1.0, n, k),
    }
    return place_on_ground(scene)


def place_on_ground(scene: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Set each object's contact point `foot` and image centre `cy` from its distance: it stands on the
    ground, so the nearer, the lower in the frame. (Call again after changing `z` or `height`.)"""
    scene["foot"] = scene["horizon"][:, None] + scene["cam_height"][:, None] / scene["z"]
    # clamped: objects of ground-less scenes (horizon at the bottom edge) stay in view
    scene["cy"] = (scene["foot"] - scene["height"] / scene["z"] / 2).clamp(max=0.85)
    return scene


def _shape(u, v, cx, cy, w, h, kind):
    """Coordinates across the bounding box ([-1, 1]), the silhouette, and the bulge's cap (0 at the rim)."""
    dx, dy = (u - cx) / (w / 2), (v - cy) / (h / 2)
    rect = (dx.abs() < 1) & (dy.abs() < 1)
    ellipse = dx ** 2 + dy ** 2 < 1
    # a T-shirt: narrow body, sleeves across the top, a neck notch
    shirt = (((dx.abs() < 0.6) & (dy.abs() < 1)) | ((dx.abs() < 1) & (dy > -1) & (dy < -0.4))) \
        & ~((dx.abs() < 0.2) & (dy < -0.8))
    mask = torch.where(kind == 0, rect, torch.where(kind == 1, ellipse, shirt))
    # ellipses bulge like spheres, the others bend like cylinders about the vertical axis
    sphere = kind == 1
    cap = torch.where(sphere, 1 - dx ** 2 - dy ** 2, 1 - dx ** 2).clamp(min=0.0)
    return dx, dy, mask, sphere, cap


def draw_scenes(scene: dict[str, torch.Tensor], size: int, generator: torch.Generator | None = None,
                supersample: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render `sample_scenes` parameters: images [n,1,size,size] in [0,1], metric depth z [n,1,size,size]
    (> 0), and which surface each pixel shows [n,1,size,size] (int64; 0 background, 1 + i object i).

    Occlusion is a z-buffer over the background and every object. Rendered at `supersample`x and
    box-filtered, so edges are antialiased like the pixels of a photograph. `generator` draws the sensor
    noise (none without one).
    """
    n, k = scene["z"].shape
    r = size * supersample
    coords = (torch.arange(r, dtype=torch.float32) + 0.5) / r
    v, u = coords.view(1, 1, r, 1), coords.view(1, 1, 1, r)  # v = 0 is the top row
    bg = {key: t.view(n, 1, 1, 1) for key, t in scene.items() if t.ndim == 1}
    ob = {key: t.view(n, k, 1, 1) for key, t in scene.items() if t.ndim == 2}

    # Background: the ground below the horizon up to where the wall stands, the wall elsewhere
    z_ground = torch.where(v > bg["horizon"], bg["cam_height"] / (v - bg["horizon"]).clamp_min(1e-6), math.inf)
    on_ground = z_ground < bg["z_wall"]
    z_bg = torch.where(on_ground, z_ground, bg["z_wall"]).expand(n, 1, r, r)
    ground_x, ground_z = (u - 0.5) * z_ground.clamp(max=100.0), z_ground.clamp(max=100.0)
    checker = torch.sign(torch.sin(math.pi * ground_x / bg["checker_side"]) * torch.sin(math.pi * ground_z / bg["checker_side"]))
    i_bg = torch.where(on_ground, bg["ground_albedo"] * (1 + bg["ground_contrast"] * checker), bg["wall_albedo"])

    # Z-buffer: the nearest surface wins
    w, h = ob["width"] / ob["z"], ob["height"] / ob["z"]  # image size
    _, _, mask, _, cap = _shape(u, v, ob["cx"], ob["cy"], w, h, ob["kind"])
    z_obj = ob["z"] - ob["bulge"] * torch.sqrt(cap) * ob["width"] / 2
    z_all = torch.cat([z_bg, torch.where(mask & ob["active"], z_obj, math.inf)], dim=1)
    z, winner = z_all.min(dim=1)  # [n, r, r]

    # Shade only the visible surfaces: each pixel gathers its winning object's parameters
    names = ("cx", "cy", "kind", "bulge", "z", "light_x", "light_y", "stripe_freq", "stripe_contrast", "albedo")
    params = torch.stack([scene[key] for key in names] + [scene["width"] / scene["z"], scene["height"] / scene["z"],
                          torch.cos(scene["stripe_angle"]), torch.sin(scene["stripe_angle"])], dim=1)  # [n, P, K]
    index = (winner - 1).clamp(min=0).view(n, 1, r * r).expand(n, params.shape[1], r * r)
    p = dict(zip(names + ("w", "h", "cos", "sin"), params.gather(2, index).view(n, -1, 1, r, r).unbind(1)))
    dx, dy, _, sphere, cap = _shape(u, v, p["cx"], p["cy"], p["w"], p["h"], p["kind"])
    # Lambert shading from the bulge's surface normal
    root = torch.sqrt(cap.clamp(min=0.05))
    nx, ny = p["bulge"] * dx / root, torch.where(sphere, p["bulge"] * dy / root, 0.0)
    lx, ly = p["light_x"], p["light_y"]
    lambert = (nx * lx + ny * ly + 1) / (torch.sqrt(nx ** 2 + ny ** 2 + 1) * torch.sqrt(lx ** 2 + ly ** 2 + 1))
    # stripes fixed in world units: their image frequency grows with distance (a texture gradient)
    phase = ((u - p["cx"]) * p["cos"] + (v - p["cy"]) * p["sin"]) * p["z"]
    stripes = torch.sin(2 * math.pi * p["stripe_freq"] * phase)
    i_obj = p["albedo"] * (0.3 + 0.7 * lambert.clamp(min=0.0)) * (1 + p["stripe_contrast"] * stripes)

    # Soft contact shadows on the ground under each object (the darkest one counts)
    spread = ((u - ob["cx"]) / (0.6 * w)) ** 2 + ((v - ob["foot"]) / (0.15 * h)) ** 2
    spread = torch.where(ob["active"], spread, math.inf).amin(dim=1, keepdim=True)
    i_bg = torch.where(on_ground, i_bg * (1 - 0.5 * torch.exp(-spread)), i_bg)

    z = z.unsqueeze(1)
    intensity = torch.where(winner.unsqueeze(1) == 0, i_bg, i_obj)
    intensity = intensity * torch.exp(-bg["fog"] * (z - NEAR))  # fog toward black

    # Box-filter down; depth is averaged as disparity so silhouettes blend like the image does
    intensity = F.avg_pool2d(intensity, supersample)
    z = 1 / F.avg_pool2d(1 / z, supersample)
    # Camera: exposure, black level, sensor noise
    intensity = intensity * bg["gain"] + bg["offset"]
    if generator is not None:
        intensity = intensity + bg["noise"] * torch.randn(intensity.shape, generator=generator)
    surface_id = winner[:, None, supersample // 2::supersample, supersample // 2::supersample]
    return intensity.clamp(0.0, 1.0), z, surface_id


def _render(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return draw_scenes(sample_scenes(n, g), size, g)


def normalize_per_image(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise each [1, H, W] map of a batch to [0, 1] (a constant map becomes 0)."""
    flat = x.flatten(1)
    lo, hi = flat.min(dim=1).values.view(-1, 1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp_min(eps)


def render_scenes(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural scenes for training the MiDaS stand-in: (images, targets), both [n, 1, size, size].

    images: grayscale in [0, 1]. targets: exact relative inverse depth (disparity, 1/z) normalised per
    image to [0, 1] -- 1 = the nearest pixel, 0 = the farthest -- the MiDaS output convention.
    """
    images, z, _ = _render(n, size, generator)
    return images, normalize_per_image(1 / z)


# --------------------------------------------------------------------------------------------------
# The stand-in network
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
# Training and evaluation
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


def near_far_scenes(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Scenes of exactly two objects, object 0 near (z in [2, 3.5]), object 1 far (z in [7, 11]), all
    other parameters as `sample_scenes` draws them."""
    scene = sample_scenes(n, generator)
    k = scene["z"].shape[1]
    scene["active"] = torch.arange(k).expand(n, k) < 2
    scene["z"][:, 0] = _uniform(NEAR, 3.5, (n,), generator)
    scene["z"][:, 1] = _uniform(7.0, 11.0, (n,), generator)
    return place_on_ground(scene)


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
    images, z, surface_id = _render(n, size, g)
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


# --------------------------------------------------------------------------------------------------
# The real MiDaS (paper-scale profile)
# --------------------------------------------------------------------------------------------------

class MidasDepth(nn.Module):
    """controlnet-aux's MiDaS DPT-Hybrid network as a module: images [N, C, H, W] in [0, 1] -> [N, 1, H, W] in [0, 1].

    Like `MidasDetector.__call__`, but on tensors and batched: gray to RGB, resize so the short side is
    `detect_resolution` (both sides rounded to a multiple of 32, as DPT needs), scale to [-1, 1], run the
    network, resize back, min-max normalise per image (MiDaS disparity, so 1 = near).
    Differentiable with respect to the images; the weights are frozen and the network stays in eval mode.
    """

    def __init__(self, model: nn.Module, detect_resolution: int = 384):
        super().__init__()
        self.model = model
        self.detect_resolution = detect_resolution

    def train(self, mode: bool = True) -> "MidasDepth":
        super().train(mode)
        self.model.eval()  # a frozen annotator: never dropout, whatever the caller's mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        k = self.detect_resolution / min(h, w)
        size = (max(32, round(h * k / 32) * 32), max(32, round(w * k / 32) * 32))
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=k < 1)
        x = x.clamp(0, 1) * 2 - 1  # bicubic overshoots; MiDaS DPT expects [-1, 1]
        depth = self.model(x).unsqueeze(1)  # DPTDepthModel returns [N, H, W]
        depth = F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=False, antialias=size[0] > h)
        return normalize_per_image(depth)


def load_controlnet_aux_midas(path_or_hub_id: str, detect_resolution: int = 384) -> MidasDepth:
    """MiDaS DPT-Hybrid as a frozen eval-mode `MidasDepth`, from a local directory holding
    `dpt_hybrid-midas-501f0c75.pt` (what `MidasDetector.from_pretrained(dir)` reads) or a hub id
    already in the local Hugging Face cache (e.g. "lllyasviel/Annotators"; nothing is downloaded).

    The network is controlnet-aux's own class, but not loaded through its loader: that loader calls
    `torch.load` without `weights_only=True` and, for a missing file, downloads one. Here the timm
    backbone is built with `pretrained=False` (no download) and the checkpoint is read with
    `weights_only=True`, then loaded strictly.
    """
    # MidasDetector.from_pretrained looks for this path inside the lllyasviel/ControlNet repo
    hub_name = "annotator/ckpts/" + MIDAS_FILE if path_or_hub_id == "lllyasviel/ControlNet" else None
    model_path = weights_file(path_or_hub_id, MIDAS_FILE, hub_name)
    # read before building: a bad file fails fast, and weights_only refuses anything but tensors and containers
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    if "optimizer" in state:  # a training checkpoint, as BaseModel.load handles
        state = state["model"]
    # controlnet_aux.midas.midas.* imports controlnet_aux's package __init__, which imports every annotator
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    # path=None: no BaseModel.load; DPT builds its timm backbone with pretrained=False, so nothing is fetched
    model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    model.load_state_dict(state)  # strict: a checkpoint of another architecture fails here, naming the keys
    model.eval().requires_grad_(False)
    return MidasDepth(model, detect_resolution).eval()
