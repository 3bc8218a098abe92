"""Procedural scenes with exact depth: the training data and the held-out test renders of the depth
stand-in (jdm/annotators/depth.py).

`sample_scenes` draws scene parameters (camera, ground, wall, 1-4 objects) and `draw_scenes`
renders them to grayscale images, metric depth and per-pixel surface ids; `render_scenes` pairs the
images with their targets in the depth convention (`jdm.annotators.normalize_per_image`);
`near_far_scenes` poses one near and one far object for the near/far metric.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from jdm.annotators import normalize_per_image

MAX_OBJECTS = 4
NEAR = 2.0  # nearest object distance; fog attenuation starts here


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


def render_scenes(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural scenes for training the MiDaS stand-in: (images, targets), both [n, 1, size, size].

    images: grayscale in [0, 1]. targets: exact relative inverse depth (disparity, 1/z) normalised per
    image to [0, 1] -- 1 = the nearest pixel, 0 = the farthest -- the MiDaS output convention.
    """
    images, z, _ = draw_scenes(sample_scenes(n, generator), size, generator)
    return images, normalize_per_image(1 / z)


def near_far_scenes(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Scenes of exactly two objects, object 0 near (z in [2, 3.5]), object 1 far (z in [7, 11]), all
    other parameters as `sample_scenes` draws them."""
    scene = sample_scenes(n, generator)
    k = scene["z"].shape[1]
    scene["active"] = torch.arange(k).expand(n, k) < 2
    scene["z"][:, 0] = _uniform(NEAR, 3.5, (n,), generator)
    scene["z"][:, 1] = _uniform(7.0, 11.0, (n,), generator)
    return place_on_ground(scene)
