"""The evaluation stages: the teacher's own scores, the FID reference of the table, and each method's
rows on the held-out maps, scored the same way (jdm/evaluation.py) with intervals."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

import torch

from .. import data as jdata
from ..config import Params
from ..conditions import condition_slug
from ..io import atomic_dir, save_tensors, write_json
from ..tracking import image_grid, stage_run
from ..variants import METHODS, require_row
from .common import (ANNOTATORS, METRICS, MODELS, PREPARED, REFERENCE, SAMPLES, SAMPLES_SHOWN, TEACHER,
                     load_condition_maps, section, setup)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from accelerate import PartialState
    from diffusers import ControlNetModel

    from ..annotators.classifier import Classifier
    from ..evaluation import Sampler
    from ..models.backbone import Backbone
    from ..training.parallel import Shard


def held_out_prompts(params: Params, prepared: jdata.PreparedData, name: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
    """The first `evaluation.control_samples` held-out images: prompt embeddings, classes, and maps of `name`."""
    n = params.evaluation.control_samples
    held_out = prepared.split("eval")
    n = min(n, len(held_out))
    pid = held_out.prompt_ids[:n]
    hidden, mask = prepared.embeddings()
    maps = load_condition_maps(name)["eval"][:n] if name is not None else None
    return hidden[pid], mask[pid], torch.tensor(prepared.prompt_classes)[pid], maps, (hidden[:1], mask[:1])


def held_out_images(params: Params, prepared: jdata.PreparedData) -> torch.Tensor:
    """The real images of `held_out_prompts`'s maps, in [0,1]."""
    return prepared.split("eval").pixels(slice(0, params.evaluation.control_samples))


def process_shard() -> tuple[PartialState, Shard]:
    """accelerate's view of this process, and its share of the sampling: all of it, or under `accelerate
    launch` every N-th batch (jdm/evaluation.py `generate`; the main process alone scores and records)."""
    from ..training.parallel import Shard, process_state

    state = process_state()
    return state, Shard.of(state)


def evaluation_device(params: Params) -> torch.device:
    """Where the evaluation stages sample and compute features: accelerate's device (a GPU where there
    is one). Noise is drawn on the CPU and images come back to it, so the device changes no draw, and
    conditions and judges (a plugin's too) score on the CPU as they always have."""
    from ..training.accel import make_accelerator
    from ..training.parallel import process_state

    # first, as the training stages do: under `accelerate launch` on a machine without a GPU the process
    # group is gloo's, which an Accelerator made first would not start (each process would run alone)
    process_state()
    return make_accelerator(params.acceleration).device


def _feature_nets(params: Params, classifier, device: torch.device) -> dict:
    """The feature spaces FID and KID are computed in, on `device`: the classifier's, and Inception's when on."""
    from ..metrics import ClassifierFeatures, InceptionFeatures

    nets = {"classifier": ClassifierFeatures(classifier)}
    if params.evaluation.inception_fid:
        nets["inception"] = InceptionFeatures()
    return {name: net.to(device) for name, net in nets.items()}


def spaces_of(params: Params, classifier: Classifier, reference: torch.Tensor, device: torch.device) -> dict:
    """Each feature space with the features of `reference` (images in [0,1])."""
    from ..evaluation import FeatureSpace
    from ..metrics import features

    return {name: FeatureSpace(net, features(net, reference))
            for name, net in _feature_nets(params, classifier, device).items()}


def _saved_spaces(params: Params, classifier, device: torch.device) -> dict:
    """Each feature space with the table's reference features, as the reference stage saved them."""
    from ..errors import UserError
    from ..evaluation import FeatureSpace
    from ..io import load_tensors

    path = REFERENCE / "features.safetensors"
    saved = load_tensors(path)
    nets = _feature_nets(params, classifier, device)
    missing = [name for name in nets if name not in saved]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)} features (it has {', '.join(saved) or 'none'}): "
                        "run `jdm reference` again (DVC: the reference stage)")
    return {name: FeatureSpace(net, saved[name].numpy()) for name, net in nets.items()}


def teacher_sampler(params: Params, backbone: Backbone, null: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                    controlnet: ControlNetModel | None = None) -> Sampler:
    from ..evaluation import multi_step_sampler
    from ..models.teacher import load_teacher

    e = params.evaluation
    unet, noise_scheduler = load_teacher(TEACHER)
    return multi_step_sampler(unet, noise_scheduler.config, backbone, params.data.image_size // backbone.factor, null,
                              steps=e.num_inference_steps, guidance_scale=e.guidance_scale, sampler=e.sampler,
                              controlnet=controlnet, device=device)


def run_evaluate_teacher(params: Params) -> None:
    """Teacher samples (multi-step, CFG): prompt accuracy, FID and KID against the test split, with intervals."""
    from ..annotators.classifier import load_classifier
    from ..evaluation import score_samples
    from ..metrics import prompt_hits
    from ..models.teacher import build_backbone, load_teacher
    from ..sampling import sample_cfg

    setup(params)
    e = params.evaluation
    prepared = jdata.PreparedData.load(PREPARED)
    classifier = load_classifier(ANNOTATORS / "classifier")
    device = evaluation_device(params)
    classifier.to(device)
    with stage_run("evaluate-teacher", params.profile, section(params, "evaluation")) as mlflow:
        unet, noise_scheduler = load_teacher(TEACHER)
        backbone = build_backbone(params)
        unet.to(device), backbone.to(device)
        hidden_table, mask_table = (x.to(device) for x in prepared.embeddings())
        g = torch.Generator().manual_seed(params.seed)
        pid, classes = jdata.scoring_prompts(prepared, params.data, e.num_samples, g)
        size = params.data.image_size // backbone.factor
        start = time.perf_counter()
        samples = []
        for i in range(0, e.num_samples, e.batch_size):
            sl = slice(i, i + e.batch_size)
            x = sample_cfg(unet, noise_scheduler.config, hidden_table[pid[sl]], mask_table[pid[sl]],
                           hidden_table[:1], mask_table[:1], shape=(backbone.channels, size, size),
                           steps=e.num_inference_steps, guidance_scale=e.guidance_scale, sampler=e.sampler, generator=g)
            samples.append(backbone.decode(x).cpu())
        samples = torch.cat(samples)
        sample_seconds = time.perf_counter() - start
        start = time.perf_counter()
        spaces = spaces_of(params, classifier, prepared.split("test").pixels(slice(0, e.fid_reference)), device)
        metrics = {"nfe": e.num_inference_steps * (2 if e.guidance_scale != 1.0 else 1), "sample_seconds": sample_seconds,
                   **score_samples(samples, spaces, {"prompt_accuracy": prompt_hits(classifier, samples, classes).float()},
                                   resamples=e.bootstrap_resamples, seed=params.seed)}
        metrics["score_seconds"] = time.perf_counter() - start
        mlflow.log_metrics(metrics)
        order = torch.argsort(classes[:80], stable=True)
        mlflow.log_image(image_grid(samples[:80][order], nrow=8), "teacher_samples.png")
        write_json(metrics, METRICS / "teacher.json")
        log.info(f"evaluate-teacher: {json.dumps(metrics)}")


def run_reference(params: Params) -> None:
    """The FID reference of the table: the teacher's samples *without* control for the prompts of the
    held-out maps, and their features in each space, computed once for every method and condition."""
    from ..annotators.classifier import load_classifier
    from ..evaluation import reference_samples
    from ..models.teacher import build_backbone

    setup(params)
    prepared = jdata.PreparedData.load(PREPARED)
    hidden, mask, _, _, null = held_out_prompts(params, prepared)
    backbone = build_backbone(params)
    classifier = load_classifier(ANNOTATORS / "classifier")
    device = evaluation_device(params)
    state, shard = process_shard()

    def sample():
        return reference_samples(teacher_sampler(params, backbone, null, device), hidden, mask,
                                 batch_size=params.evaluation.batch_size, seed=params.seed, shard=shard)
    if not state.is_main_process:
        sample()
        return
    with stage_run("reference", params.profile, section(params, "evaluation")) as mlflow:
        start = time.perf_counter()
        samples = sample()
        sample_seconds = time.perf_counter() - start
        spaces = spaces_of(params, classifier, samples, device)
        with atomic_dir(REFERENCE) as out:
            save_tensors({name: torch.from_numpy(space.reference) for name, space in spaces.items()},
                         out / "features.safetensors")
            save_tensors({"samples": (samples * 255).round().to(torch.uint8)}, out / "samples.safetensors")
        metrics = {"num_samples": len(samples), "sample_seconds": sample_seconds,
                   "feature_seconds": time.perf_counter() - start - sample_seconds}
        mlflow.log_metrics({**metrics, "num_processes": state.num_processes})
        mlflow.log_image(image_grid(samples[:64]), "reference_samples.png")
        log.info(f"reference: {json.dumps(metrics)}")


def _method_sampler(params: Params, method: str, name: str, backbone, null, device: torch.device):
    from ..evaluation import one_step_sampler
    from ..pipeline import load_controlnet, load_generator

    generator_root, controlnet_root = METHODS[method]
    path = controlnet_root / f"controlnet-{condition_slug(name)}"
    if generator_root is None:
        return teacher_sampler(params, backbone, null, device, controlnet=load_controlnet(path)[1])
    generator, _, _ = load_generator(generator_root / "generator", primary=True)
    # the method's own ControlNet, unless it is the generator's primary one (the warm-up condition's row of
    # JDM and w/o modelling); on the DI generator, which has none, every row loads its own
    if controlnet_root != generator_root or name not in generator.names:
        generator, _, _ = load_generator(generator_root / "generator", {name: path}, primary=False)
    return one_step_sampler(generator, name, backbone, params.data.image_size // backbone.factor, device)


def run_evaluate(params: Params, methods: list[str], name: str) -> None:
    """Rows of the table for condition `name`: each method sampled on the same held-out maps and
    prompts, scored the same way; one MLflow run per method (tags `method`, `condition`)."""
    from PIL import Image

    from ..annotators.classifier import load_classifier
    from ..conditions import load_condition
    from ..errors import UserError
    from ..evaluation import generate, latency_ms, score
    from ..judges import load_judge
    from ..models.teacher import build_backbone

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(map(repr, unknown))}; available: {', '.join(METHODS)}")
    for method in methods:
        require_row(method, name, params.warmup.condition)
    setup(params)
    condition = load_condition(name, params, MODELS)
    prepared = jdata.PreparedData.load(PREPARED)
    hidden, mask, classes, maps, null = held_out_prompts(params, prepared, name)
    backbone = build_backbone(params)
    classifier = load_classifier(ANNOTATORS / "classifier")
    device = evaluation_device(params)
    classifier.to(device)
    spaces = _saved_spaces(params, classifier, device)
    judge = load_judge(name, params, MODELS)
    real = held_out_images(params, prepared) if judge is not None else None
    slug = condition_slug(name)
    state, shard = process_shard()

    def sample(method: str):
        sampler = _method_sampler(params, method, name, backbone, null, device)
        return sampler, generate(sampler, hidden, mask, maps, batch_size=params.evaluation.batch_size, seed=params.seed,
                                 shard=shard)
    if not state.is_main_process:  # under `accelerate launch`: sample beside the main process, which scores
        for method in methods:
            sample(method)
        return
    # one parent run per condition, a nested run per method: the MLflow UI groups a condition's rows
    with stage_run("evaluation", params.profile, section(params, "evaluation"), condition=name,
                   tags={"methods": ",".join(methods)}):
        for method in methods:
            with stage_run("evaluate", params.profile, section(params, "evaluation"), condition=name,
                           tags={"method": method}) as mlflow:
                start = time.perf_counter()
                sampler, samples = sample(method)
                sample_seconds = time.perf_counter() - start
                metrics = {"nfe": sampler.nfe, "sample_seconds": sample_seconds,
                           "latency_ms": latency_ms(sampler, hidden, mask, maps, params.evaluation.latency_repeats),
                           **score(samples, maps, classes, condition, classifier, spaces,
                                   resamples=params.evaluation.bootstrap_resamples, seed=params.seed,
                                   judge=judge, real=real)}
                mlflow.log_metrics({**metrics, "num_processes": state.num_processes})
                grid = image_grid(samples[:SAMPLES_SHOWN], nrow=SAMPLES_SHOWN)  # make_grid turns gray into RGB
                mlflow.log_image(grid, f"{method}_{slug}_samples.png")
                SAMPLES.mkdir(parents=True, exist_ok=True)
                Image.fromarray(grid).save(SAMPLES / f"{method}-{slug}.png")
                write_json({"method": method, "condition": name, **metrics}, METRICS / "eval" / f"{method}-{slug}.json")
                log.info(f"evaluate {method} {name}: {json.dumps(metrics)}")

