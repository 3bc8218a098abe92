"""The JDM phases as stages: the joint warm-up (generator + the first ControlNet) and the extension (a
new ControlNet on the frozen generator), for JDM and for each variant of jdm/variants.py trained by the
same machinery (jdm/training/phases.py); each scores its control on held-out maps as it trains."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import data as jdata
from ..config import Params
from ..conditions import condition_slug
from ..io import atomic_dir, write_json
from ..tracking import channel_tiles, image_grid, stage_run
from ..training.checkpoint import remove_checkpoint
from ..variants import VARIANTS, Variant, require_row
from .common import (ANNOTATORS, CHECKPOINTS, METRICS, MODELS, PREPARED, TEACHER, checkpoint_spec, control_data,
                     curve_path, logger, recording, section, setup)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import numpy as np

    from ..annotators.classifier import Classifier
    from ..conditions import Condition
    from ..models.backbone import Backbone
    from ..models.generator import OneStepGenerator
    from ..training.phases import ControlData


@torch.no_grad()
def validate(generator: OneStepGenerator, condition: Condition | None, backbone: Backbone, held_out: ControlData,
             prompt_classes: list[int], classifier: Classifier, num: int, seed: int) -> tuple[dict[str, float], np.ndarray]:
    """One-step samples for the *last* `num` held-out maps (the validation maps; the table reads the
    first `evaluation.control_samples`, config.py keeps them apart): prompt accuracy, FID and KID in
    the classifier's features against the maps' own images, and, when the generator has the
    condition's ControlNet, consistency with it and with it removed. Returns (metrics, grid of
    map | controlled | uncontrolled, or the uncontrolled samples alone)."""
    from ..annotators.classifier import predict
    from ..metrics import ClassifierFeatures, consistency, features, fid, kid

    num = min(num, len(held_out.maps))
    maps, pid, real = held_out.maps[-num:], held_out.prompt_ids[-num:], held_out.images[-num:]
    hidden, mask = held_out.hidden, held_out.mask
    classes = torch.tensor(prompt_classes)[pid]
    g = torch.Generator().manual_seed(seed)
    size = maps.shape[-1] // backbone.factor
    device = next(generator.parameters()).device  # the accelerator's, when called during training
    z = torch.randn((num, backbone.channels, size, size), generator=g).to(device)
    maps_on, hidden, mask = maps.to(device), hidden.to(device), mask.to(device)
    controlled = condition is not None and condition.name in generator.names
    was_training = generator.training
    generator.eval()
    samples = {}
    for key, controls in (("controlled", {condition.name: maps_on} if controlled else None), ("uncontrolled", {})):
        if controls is None:
            continue
        samples[key] = torch.cat([backbone.decode(generator(z[i:i + 64], hidden[pid[i:i + 64]], mask[pid[i:i + 64]],
                                                           {k: v[i:i + 64] for k, v in controls.items()})).cpu()
                                  for i in range(0, num, 64)])
    generator.train(was_training)
    shown = samples.get("controlled", samples["uncontrolled"])
    net = ClassifierFeatures(classifier)
    shown_features, real_features = features(net, shown), features(net, real)
    metrics = {"num_eval_maps": num,
               "prompt_accuracy": (predict(classifier, shown) == classes).float().mean().item(),
               "fid_classifier": fid(shown_features, real_features),
               "kid_classifier": kid(shown_features, real_features)}
    if controlled:
        metrics["consistency"] = consistency(condition, samples["controlled"], maps)
        metrics["consistency_without_controlnet"] = consistency(condition, samples["uncontrolled"], maps)
    k = min(num, 8)
    rows = [maps, samples["controlled"], samples["uncontrolled"]] if controlled else [samples["uncontrolled"]]
    return metrics, image_grid(torch.cat([channel_tiles(x[:k]) for x in rows]), nrow=k)


def _phase_settings(params: Params, stage: str, condition: str, method: str) -> dict:
    """What a checkpoint must agree with to be resumed: this stage's params, the condition, the method."""
    return {**section(params, "jdm", stage, "teacher", "conditions", "acceleration"), "condition": condition,
            "method": method}


def _variant_paths(v: Variant, phase: str, name: str) -> tuple[str, Path, Path]:
    """(MLflow stage name, metrics file, checkpoint folder); JDM keeps the names `dvc.yaml` has always had."""
    suffix = "" if phase == "warmup" else f"-{condition_slug(name)}"
    if v.method == "jdm":
        return phase, METRICS / f"{phase}{suffix}.json", CHECKPOINTS / f"{phase}{suffix}"
    return v.method, METRICS / "baselines" / f"{v.method}{suffix}.json", CHECKPOINTS / f"{v.method}{suffix}"


def run_jdm_phase(params: Params, name: str, phase: str, method: str = "jdm") -> None:
    """`warmup` (phase 1: generator UNet + the primary ControlNet) or `extend` (phase 2: a new
    ControlNet on the frozen generator), for JDM or one of the VARIANTS. Both train with the JDM
    objective, checkpoint and resume, save diffusers folders, and score the control on held-out maps."""
    from ..annotators.classifier import load_classifier
    from ..conditions import load_condition
    from ..models.fake_score import build_fake_score, load_fake_score, save_fake_score
    from ..models.teacher import build_backbone, load_teacher
    from ..objectives import VPSchedule
    from ..pipeline import load_generator, save_controlnet, save_generator
    from ..training.parallel import process_state
    from ..training.phases import build_generator, train_phase

    require_row(method, name, params.warmup.condition)
    setup(params)
    variant = VARIANTS[method]
    jdm_params = params.jdm
    if phase == "extend" and name != params.warmup.condition and params.extend.condition_weight is not None:
        jdm_params = jdm_params.model_copy(update={"condition_weight": params.extend.condition_weight})
    jdm_params = jdm_params.model_copy(update=dict(variant.overrides))  # a variant's own weight (0 for DI) wins
    condition = load_condition(name, params, MODELS)
    prepared = jdata.PreparedData.load(PREPARED)
    data, held_out = control_data(prepared, name)
    condition.check_map(data.maps[:1], params.data.image_size)
    classifier = load_classifier(ANNOTATORS / "classifier")
    teacher_unet, noise_scheduler = load_teacher(TEACHER)
    schedule = VPSchedule.from_scheduler(noise_scheduler)
    backbone = build_backbone(params)
    if phase == "warmup":
        steps, shared_unet = params.warmup.steps, None
        fake, _ = build_fake_score(teacher_unet, jdm_params.lora_rank)
    else:
        # a ControlNet for the warm-up's own condition (Eq. 12 and w/o warm-up on canny) trains as long as
        # JDM's phase 1 trained its: the rows compared differ in the method, not in the budget
        steps = params.warmup.steps if name == params.warmup.condition else params.extend.steps
        shared_unet = load_generator(variant.source / "generator", primary=False)[0].unet
        # the warm-up's fake score already models this generator's distribution: start from it
        fake, _ = load_fake_score(variant.source / "fake_score", jdm_params.lora_rank)
    generator = build_generator(teacher_unet, schedule, condition, backbone, jdm_params.t_gen, unet=shared_unet,
                                with_controlnet=variant.with_controlnet)
    unet_before = {k: w.clone() for k, w in generator.unet.state_dict().items()} if shared_unet is not None else None
    stage_params = {**section(params, "jdm", phase, "acceleration"), "jdm": jdm_params.model_dump(mode="json")}
    stage, metrics_file, ckpt_dir = _variant_paths(variant, phase, name)
    curve = []  # the validation scores against the step: MLflow's metric history and a DVC plot
    checkpoint = checkpoint_spec(params, ckpt_dir, _phase_settings(params, phase, name, method))

    def evaluate():
        scores = validate(generator, condition, backbone, held_out, prepared.prompt_classes, classifier,
                          jdm_params.eval_samples, params.seed)[0]
        return {f"eval_{k}": val for k, val in scores.items() if k != "num_eval_maps"}

    def train(log_step) -> int:
        resumed_from = train_phase(generator, teacher_unet, fake, condition, data, backbone, schedule, jdm_params, steps,
                                   train_unet=shared_unet is None, seed=params.seed, log=log_step,
                                   checkpoint=checkpoint,
                                   evaluate=evaluate, acceleration=params.acceleration)
        if unet_before is not None:
            # phase 2 must not touch the shared generator: checked on every run and every process, not assumed
            same = all(torch.equal(unet_before[k], val) for k, val in generator.unet.state_dict().items())
            if not same:
                raise RuntimeError("the frozen generator UNet changed during the extension phase")
        return resumed_from

    state = process_state()
    if not state.is_main_process:  # under `accelerate launch`: train beside the main process, which records
        train(lambda step, values: None)
        return
    with stage_run(stage, params.profile, stage_params, condition=name, tags={"method": method}) as mlflow:
        start = time.perf_counter()
        resumed_from = train(recording(logger(mlflow), curve, keep=checkpoint.records))
        metrics = {"train_seconds": time.perf_counter() - start, "steps": steps, "resumed_from_step": resumed_from}
        mlflow.log_metric("num_processes", state.num_processes)
        scores, grid = validate(generator, condition, backbone, held_out, prepared.prompt_classes, classifier,
                                jdm_params.eval_samples, params.seed)
        metrics.update(scores)
        mlflow.log_image(grid, f"{condition_slug(name)}_validation.png")
        write_json(curve, curve_path(metrics_file))
        if unet_before is not None:
            metrics["generator_unchanged"] = 1.0
        if phase == "warmup":
            meta = {"image_size": params.data.image_size, "image_channels": backbone.image_channels,
                    "vae": params.teacher.pretrained, "primary_condition": name if variant.with_controlnet else None,
                    "text_encoder": params.text_encoder.model_dump(mode="json")}
            with atomic_dir(variant.root / "generator") as out:
                save_generator(generator, noise_scheduler, out, meta)
            with atomic_dir(variant.root / "fake_score") as out:
                save_fake_score(fake, out)
            mlflow.log_artifacts(str(variant.root / "generator"), "generator")
        else:
            out_dir = variant.root / f"controlnet-{condition_slug(name)}"
            with atomic_dir(out_dir) as out:
                save_controlnet(generator.controlnet(condition.name), name, out)
            mlflow.log_artifacts(str(out_dir), "controlnet")
        mlflow.log_metrics(metrics)
        write_json({"condition": name, "method": method, **metrics}, metrics_file)
        log.info(f"{stage} {name}: {json.dumps(metrics)}")
    remove_checkpoint(ckpt_dir)  # the outputs are saved: the checkpoint has done its job

