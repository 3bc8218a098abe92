"""How far the plain one-step student gets towards its teacher in Inception features as it trains.

The DI student (`paper/dvc.yaml:di`: JDM phase 1 without condition term and without ControlNet, the
`jdm` params of params.yaml) is trained for `--steps` iterations and, at the start and every
`--every` iterations, sampled in one step for the table's held-out prompts with the evaluation's
noise, and scored against the FID reference (the teacher's 50-step CFG samples for those prompts):
Inception FID and KID, the FID split into its mean and covariance terms and the features' spread
beside the reference's (infra/fid_gap.py), and the validation scores every stage logs (classifier
FID against the validation maps' images, prompt accuracy). Run in a workspace where `make run` has
built the teacher, the conditions and the FID reference:

    python infra/inception_curve.py --steps 1500 --every 250             # -> metrics/diagnostics/di-curve.json
    python infra/inception_curve.py --steps 500 --set jdm.fake_steps=5   # -> .../di-curve-fake_steps=5.json

A diagnostic, not a stage: it saves no model and reads the table's prompts and the reference only to
score, never to train.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fid_gap import feature_spread, feature_terms, write_diagnostic  # noqa: E402
from sweep import _label, _value  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="iterations (default: warmup.steps, as the `di` stage)")
    ap.add_argument("--every", type=int, default=250, help="score every N iterations (default 250)")
    ap.add_argument("--set", action="append", default=[], metavar="jdm.KEY=VALUE",
                    help="a `jdm` param for this run (repeatable), e.g. jdm.fake_steps=5")
    ap.add_argument("--out", type=Path, default=None, help="default: metrics/diagnostics/di-curve[-<settings>].json")
    args = ap.parse_args(argv)
    settings = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("jdm."):
            raise SystemExit(f"--set {item!r}: expected jdm.KEY=VALUE, a key of the `jdm` section of params.yaml")
        settings[key] = _value(value)
    if args.every < 1 or (args.steps is not None and args.steps < 1):
        raise SystemExit(f"--steps {args.steps} --every {args.every}: both must be at least 1")

    from jdm import data as jdata
    from jdm.annotators.classifier import load_classifier
    from jdm.config import load_params
    from jdm.evaluation import generate, one_step_sampler
    from jdm.io import load_tensors
    from jdm.metrics import InceptionFeatures, features, kid
    from jdm.models.fake_score import build_fake_score
    from jdm.models.teacher import build_backbone, load_teacher
    from jdm.objectives import VPSchedule
    from jdm.stages.common import REFERENCE, TEACHER, control_data, setup
    from jdm.stages.evaluation import held_out_prompts
    from jdm.stages.phases import validate
    from jdm.training.phases import build_generator, train_phase
    from jdm.variants import VARIANTS

    params = load_params(Path("params.yaml"))
    unknown = [k for k in settings if k.split(".", 1)[1] not in type(params.jdm).model_fields]
    if unknown:
        raise SystemExit(f"--set {', '.join(unknown)}: not a key of the `jdm` section of params.yaml")
    setup(params)
    steps = args.steps or params.warmup.steps
    # the DI student's params: the profile's `jdm` section, the variant's own overrides (no condition term)
    p = params.jdm.model_copy(update={**{k.split(".", 1)[1]: v for k, v in settings.items()},
                                      **dict(VARIANTS["di"].overrides), "eval_every": args.every})
    p = type(p).model_validate(p.model_dump())  # the same checks as params.yaml's
    prepared = jdata.PreparedData.load(Path("data/prepared"))
    data, held_out = control_data(prepared, params.warmup.condition)
    hidden, mask, _, _, _ = held_out_prompts(params, prepared)
    classifier = load_classifier(Path("models/annotators/classifier"))
    teacher_unet, noise_scheduler = load_teacher(TEACHER)
    schedule = VPSchedule.from_scheduler(noise_scheduler)
    backbone = build_backbone(params)
    fake, _ = build_fake_score(teacher_unet, p.lora_rank)
    generator = build_generator(teacher_unet, schedule, None, backbone, p.t_gen, with_controlnet=False)
    inception = InceptionFeatures()
    reference = features(inception, load_tensors(REFERENCE / "samples.safetensors")["samples"].float() / 255)
    reference_spread = feature_spread(reference)
    curve, start = [], time.perf_counter()

    def evaluate() -> dict:
        training = generator.training  # one_step_sampler sets eval mode; training goes on after
        device = next(generator.parameters()).device  # where train_phase put it: sampling must not move it
        sampler = one_step_sampler(generator, None, backbone, params.data.image_size // backbone.factor, device)
        own = features(inception, generate(sampler, hidden, mask, None, batch_size=params.evaluation.batch_size,
                                           seed=params.seed))
        generator.train(training)
        scores = validate(generator, None, backbone, held_out, prepared.prompt_classes, classifier, p.eval_samples,
                          params.seed)[0]
        terms = feature_terms(own, reference)
        return {**terms, "feature_spread_ratio": terms["feature_spread"] / reference_spread,
                "kid_inception": kid(own, reference), "fid_classifier": scores["fid_classifier"],
                "prompt_accuracy": scores["prompt_accuracy"]}

    def log(step: int, values: dict) -> None:
        if "fid_inception" in values:
            curve.append({"step": step, "seconds": time.perf_counter() - start, **values})
            print(curve[-1], flush=True)

    train_phase(generator, teacher_unet, fake, None, data, backbone, schedule, p, steps, train_unet=True,
                seed=params.seed, checkpoint=None, log=log, evaluate=evaluate)
    if steps % args.every:
        log(steps, evaluate())  # the generator now holds the EMA weights the stage would save
    out = {"steps": steps, "every": args.every, "settings": settings, "num_samples": len(hidden),
           "num_reference": len(reference), "curve": curve}
    name = "di-curve" + (f"-{_label(settings)}" if settings else "")
    write_diagnostic(out, args.out or Path("metrics/diagnostics") / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
