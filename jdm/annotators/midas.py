"""The real MiDaS DPT-Hybrid (`dpt_hybrid-midas-501f0c75.pt`), the depth annotator of the paper-scale
profile, through controlnet-aux's network class: loaded without running pickled code and without any
download, and wrapped as a batched, differentiable module in the depth convention
(`jdm.annotators.normalize_per_image`: per-image normalised disparity, 1 = near).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jdm.annotators import normalize_per_image, weights_file

MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"


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
