"""What separates a one-step row from ControlNet-50 in Inception features: pixel statistics and FID of
the table's own samples, beside a second draw of the teacher (the FID a perfect copy of the reference's
distribution scores at this sample count), and the FIDs again after a Gaussian blur.

Run in a workspace where `make run` has built the warm-up, the condition's ControlNets and the FID
reference; it samples as `jdm evaluate` does (the same held-out maps, prompts and noise):

    python infra/fid_gap.py canny          # -> metrics/diagnostics/fid-gap-canny.json

Per set of samples (the reference, a second teacher draw, ControlNet-50, JDM, and JDM's generator
with its ControlNet removed, same prompts and noise): mean and spread of the pixels, the fraction
near black and near white, and the total variation (mean absolute difference of neighbouring
pixels: speckle raises it); the spread of its Inception features (the trace of their covariance:
a set that covers fewer modes has less); Inception FID and KID against the reference, the FID split
into its two terms (how far the feature means lie apart, and what the covariances add: a shifted
set raises the first, a narrower or differently shaped one the second); the same FID with both
sides blurred (`--sigma` pixels), which leaves structure and takes away what differs pixel to
pixel; and, for the one-step row, the FID of its blurred samples against the unblurred reference.
A diagnostic, not a stage: it reads only the table's maps and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROWS = ("jdm", "controlnet-50")
UNCONTROLLED = "jdm without ControlNet"


def pixel_statistics(images: torch.Tensor) -> dict[str, float]:
    """Images [N,C,H,W] in [0,1]: what the eye sees of a sample set without a feature network."""
    x = images.float()
    tv = ((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()) / 2
    return {"mean": float(x.mean()), "std": float(x.std()), "near_black": float((x < 0.02).float().mean()),
            "near_white": float((x > 0.98).float().mean()), "total_variation": float(tv)}


def feature_spread(feats) -> float:
    """The trace of the features' covariance: a set that covers fewer modes spreads less."""
    import numpy as np

    return float(np.trace(np.cov(feats, rowvar=False)))


def feature_terms(own, reference) -> dict[str, float]:
    """Where a FID comes from: the squared distance of the feature means (FID's first term) and the
    rest, which the covariances make (FID = mean term + covariance term), with the features' spread."""
    from jdm.metrics import fid

    total, mean_term = fid(own, reference), float(((own.mean(0) - reference.mean(0)) ** 2).sum())
    return {"fid_inception": total, "fid_mean_term": mean_term, "fid_covariance_term": total - mean_term,
            "feature_spread": feature_spread(own)}


def write_diagnostic(out: dict, path: Path) -> None:
    """A diagnostic's JSON under metrics/diagnostics/ (or where --out says), written whole or not at all."""
    from jdm.io import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, path)
    print(f"-> {path}")


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(images, kernel_size=2 * round(3 * sigma) + 1, sigma=sigma)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("condition", help="a condition of the table (canny, hed, depth, sr)")
    ap.add_argument("--sigma", type=float, default=1.0, help="Gaussian blur in pixels (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="default: metrics/diagnostics/fid-gap-<condition>.json")
    args = ap.parse_args(argv)
    if args.sigma <= 0:
        raise SystemExit(f"--sigma {args.sigma}: the blur must be above 0 pixels")

    from jdm import data as jdata
    from jdm.config import load_params
    from jdm.evaluation import generate, one_step_sampler
    from jdm.io import load_tensors
    from jdm.metrics import InceptionFeatures, features, fid, kid
    from jdm.models.teacher import build_backbone
    from jdm.pipeline import load_generator
    from jdm.stages.common import REFERENCE
    from jdm.stages.evaluation import _method_sampler, held_out_prompts, teacher_sampler
    from jdm.variants import JDM_MODELS

    params = load_params(Path("params.yaml"))
    if not params.evaluation.inception_fid:
        raise SystemExit(f"profile {params.profile} scores no Inception FID (evaluation.inception_fid: false)")
    device = torch.device("cpu")
    prepared = jdata.PreparedData.load(Path("data/prepared"))
    hidden, mask, _, maps, null = held_out_prompts(params, prepared, args.condition)
    backbone = build_backbone(params)
    inception = InceptionFeatures().to(device)  # the table's Inception space (jdm/stages/evaluation.py)
    batch, seed = params.evaluation.batch_size, params.seed
    start = time.perf_counter()

    sets = {"reference": load_tensors(REFERENCE / "samples.safetensors")["samples"].float() / 255}
    # another noise stream than the reference's (seed + 1) and the methods' (seed): the teacher against itself
    sets["teacher (second draw)"] = generate(teacher_sampler(params, backbone, null, device), hidden, mask, None,
                                             batch_size=batch, seed=seed + 2)
    for method in ROWS:
        sets[method] = generate(_method_sampler(params, method, args.condition, backbone, null, device), hidden, mask,
                                maps, batch_size=batch, seed=seed)
    # the same generator, prompts and noise without the ControlNet: is the gap the control's or the student's?
    uncontrolled = load_generator(JDM_MODELS / "generator", primary=False)[0]
    sets[UNCONTROLLED] = generate(one_step_sampler(uncontrolled, None, backbone, params.data.image_size // backbone.factor,
                                                   device), hidden, mask, None, batch_size=batch, seed=seed)
    reference, reference_blurred = (features(inception, x) for x in (sets["reference"], blurred(sets["reference"], args.sigma)))
    out = {"condition": args.condition, "sigma": args.sigma, "num_samples": len(sets["jdm"]),
           "num_reference": len(sets["reference"]), "sets": {}}
    for name, images in sets.items():
        row = pixel_statistics(images)
        if name == "reference":
            row["feature_spread"] = feature_spread(reference)
        else:
            own, own_blurred = features(inception, images), features(inception, blurred(images, args.sigma))
            row.update(feature_terms(own, reference), kid_inception=kid(own, reference))
            row["fid_inception_both_blurred"] = fid(own_blurred, reference_blurred)
            if name == "jdm":
                row["fid_inception_blurred_against_reference"] = fid(own_blurred, reference)
        out["sets"][name] = row
        print(name, json.dumps(row), flush=True)
    out["seconds"] = time.perf_counter() - start
    write_diagnostic(out, args.out or Path("metrics/diagnostics") / f"fid-gap-{args.condition}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
