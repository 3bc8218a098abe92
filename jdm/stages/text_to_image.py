"""Table 3 as stages: reward stand-ins, the decoupled-CFG guide, the one-step text-to-image students
of jdm/variants.py, and their evaluation and report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .. import data as jdata
from ..config import Params
from ..io import atomic_dir, save_tensors, write_json
from ..tracking import image_grid, stage_run
from ..training.checkpoint import remove_checkpoint
from ..variants import TEXT_ROWS, TEXT_TO_IMAGE_VARIANTS, VARIANTS, text_to_image_overrides
from .common import (ANNOTATORS, CHECKPOINTS, METRICS, MODELS, PREPARED, SAMPLES, SAMPLES_SHOWN, TEACHER,
                     checkpoint_spec, logger, section, setup)
from .evaluation import evaluation_device, spaces_of, teacher_sampler

log = logging.getLogger(__name__)

REWARDS = MODELS / "rewards"
GUIDE = MODELS / "guide"
TEXT_TO_IMAGE = MODELS / "text-to-image"
TEXT_TO_IMAGE_REPORT = Path("reports/text-to-image")
TEXT_TO_IMAGE_METRICS = METRICS / "text-to-image"


def run_reward(params: Params, which: str) -> None:
    """A reward stand-in (jdm/rewards.py) trained by Bradley-Terry on (real, degraded) pairs from one half
    of the train split; `train` gives HFL its gradient, `heldout` only scores. Preference accuracy is
    measured on the held-out (test) split."""
    from ..rewards import preference_accuracy, save_reward, train_reward

    setup(params)
    r = params.rewards
    model_params = getattr(r, which)
    train = jdata.PreparedData.load(PREPARED).split("train")
    half = len(train) // 2
    images = train.images[:half] if model_params.half == "first" else train.images[half:]
    held_out = jdata.PreparedData.load(PREPARED).split("eval").images
    with stage_run("reward", params.profile, {**section(params, "rewards"), "which": which},
                   tags={"reward": which}) as mlflow:
        start = time.perf_counter()
        model = train_reward(images, steps=r.steps, batch_size=r.batch_size, lr=r.lr, seed=model_params.seed,
                             width=model_params.width, log=logger(mlflow))
        metrics = {"train_seconds": time.perf_counter() - start, "num_train_images": len(images),
                   "num_parameters": sum(q.numel() for q in model.parameters()),
                   **preference_accuracy(model, held_out, seed=params.seed)}
        with atomic_dir(REWARDS / which) as out:
            save_reward(model, out, metrics)
        mlflow.log_metrics(metrics)
        write_json({"reward": which, **metrics}, METRICS / "rewards" / f"{which}.json")
        log.info(f"reward {which}: {json.dumps(metrics)}")


def _heldout_denoising_loss(unet, noise_scheduler, prepared, backbone, seed: int, embeddings=None,
                            num: int = 512) -> float:
    """Plain epsilon MSE on held-out images (encoded by the backbone), the same noise and timesteps for
    every model scored; `embeddings` the prompt table the model reads (default: the teacher's)."""
    from ..training.teacher import denoising_loss

    held_out = prepared.split("eval")
    hidden, mask = prepared.embeddings() if embeddings is None else embeddings
    n = min(num, len(held_out))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return denoising_loss(unet, noise_scheduler, backbone.encode(held_out.pixels(slice(0, n))),
                              hidden[held_out.prompt_ids[:n]], mask[held_out.prompt_ids[:n]], g, None).item()


def _check_guide(unet, noise_scheduler, teacher_unet, prompt_dim: int, source: str) -> None:
    """A pretrained guide must predict epsilon on the teacher's latents and read prompts of the width its
    embeddings have (SD 2.1-base guiding SD 1.5: epsilon, the same 4-channel VAE latents, 1024-d OpenCLIP)."""
    from ..errors import UserError

    prediction = noise_scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UserError(f"guide.pretrained {source!r} predicts {prediction!r}; the decoupled CFG term needs an "
                        f"epsilon-prediction model (for SD 1.5: stable-diffusion-2-1-base, not the 768-px v-model)")
    if unet.config.in_channels != teacher_unet.config.in_channels:
        raise UserError(f"guide.pretrained {source!r} takes {unet.config.in_channels} latent channels, the teacher "
                        f"{teacher_unet.config.in_channels}: the guide must share the teacher's autoencoder")
    if unet.config.cross_attention_dim != prompt_dim:
        raise UserError(f"guide.pretrained {source!r} reads {unet.config.cross_attention_dim}-d prompt states, the "
                        f"prompt embeddings are {prompt_dim}-d: set guide.text_encoder to the guide's own encoder")


def run_guide(params: Params) -> None:
    """Decoupled CFG's guidance model, a better model of p(y | x_t) than the teacher whose fidelity term
    the students keep (the paper: SD 2.1 guiding SD 1.5). By default the teacher trained `guide.steps`
    further; with `guide.pretrained` another pipeline's UNet (a pointer, as the teacher stage writes),
    with its own prompt embeddings when `guide.text_encoder` is set. Held-out denoising loss of teacher
    and guide is recorded, so 'stronger' is measured, not assumed."""
    from ..errors import UserError
    from ..models.teacher import build_backbone, load_teacher, save_teacher
    from ..text import TextEncoder
    from ..training.teacher import train_teacher

    setup(params)
    g = params.guide
    if params.teacher.pretrained and not g.pretrained:
        raise UserError("guide.pretrained is empty but the teacher is pretrained: name the guidance model's "
                        "pipeline (a local dir or hub id; sd15: stable-diffusion-2-1-base); the guide stage trains "
                        "a guide only from a teacher it trained itself")
    settings = params.teacher.model_copy(update={"steps": g.steps, "lr": g.lr, "warmup_steps": g.warmup_steps})
    prepared = jdata.PreparedData.load(PREPARED)
    backbone = build_backbone(params)
    teacher_unet, teacher_scheduler = load_teacher(TEACHER)
    embeddings = TextEncoder.from_params(g.text_encoder).encode(prepared.prompts) if g.text_encoder else None
    checkpoint = checkpoint_spec(params, CHECKPOINTS / "guide", section(params, "teacher", "guide", "acceleration"))
    with stage_run("guide", params.profile, section(params, "teacher", "guide", "acceleration")) as mlflow:
        start = time.perf_counter()
        with atomic_dir(GUIDE) as out:
            if g.pretrained:
                write_json({"pretrained": g.pretrained}, out / "pretrained.json")
                unet, noise_scheduler = load_teacher(out)
                _check_guide(unet, noise_scheduler, teacher_unet,
                             (prepared.embeddings() if embeddings is None else embeddings)[0].shape[-1],
                             g.pretrained)
            else:
                unet, noise_scheduler = train_teacher(settings, prepared.split("train"), prepared.embeddings(),
                                                      backbone, seed=params.seed + 1, log=logger(mlflow),
                                                      checkpoint=checkpoint, init_unet=teacher_unet,
                                                      acceleration=params.acceleration)
                save_teacher(unet, noise_scheduler, out)
            if embeddings is not None:
                save_tensors({"hidden_states": embeddings[0], "attention_mask": embeddings[1]},
                             out / "embeddings.safetensors")
            metrics = {"train_seconds": time.perf_counter() - start, "steps": 0 if g.pretrained else g.steps,
                       "heldout_loss_teacher": _heldout_denoising_loss(teacher_unet, teacher_scheduler, prepared,
                                                                       backbone, params.seed),
                       "heldout_loss_guide": _heldout_denoising_loss(unet, noise_scheduler, prepared, backbone,
                                                                     params.seed, embeddings)}
        mlflow.log_metrics(metrics)
        write_json(metrics, METRICS / "guide.json")
        log.info(f"guide: {json.dumps(metrics)}")
    remove_checkpoint(checkpoint.directory)


def load_guide_embeddings() -> tuple[torch.Tensor, torch.Tensor] | None:
    """The guide's own prompt table (hidden, mask by prompt id), or None when it reads the teacher's."""
    path = GUIDE / "embeddings.safetensors"
    if not path.is_file():
        return None
    from ..io import load_tensors

    t = load_tensors(path)
    return t["hidden_states"], t["attention_mask"]


def run_text_to_image(params: Params, variant: str) -> None:
    """One Table 3 student: the Diff-Instruct generator (paper/dvc.yaml `di`) and its fake score trained
    `text_to_image.steps` further with the variant's objective (jdm/training/phases.py,
    `text_to_image_players`); `di` continues plain score distillation, so every row costs the same."""
    from ..errors import UserError
    from ..models.fake_score import load_fake_score
    from ..models.teacher import build_backbone, load_teacher
    from ..objectives import VPSchedule
    from ..pipeline import load_generator, save_generator
    from ..rewards import load_reward
    from ..training.parallel import process_state
    from ..training.phases import ControlData, text_to_image_players, train_phase

    if variant not in TEXT_TO_IMAGE_VARIANTS:
        raise UserError(f"unknown text-to-image variant {variant!r}; available: {', '.join(TEXT_TO_IMAGE_VARIANTS)}")
    setup(params)
    t = params.text_to_image
    overrides = text_to_image_overrides(variant, t.reward_weight)
    jdm_params = params.jdm.model_copy(update=overrides)
    prepared = jdata.PreparedData.load(PREPARED)
    train = prepared.split("train")
    hidden, mask = prepared.embeddings()
    data = ControlData(None, train.prompt_ids, hidden, mask)
    teacher_unet, noise_scheduler = load_teacher(TEACHER)
    schedule = VPSchedule.from_scheduler(noise_scheduler)
    backbone = build_backbone(params)
    source = VARIANTS["di"].root
    generator, _, meta = load_generator(source / "generator", primary=False)
    fake, _ = load_fake_score(source / "fake_score", jdm_params.lora_rank)
    guide_unet = load_teacher(GUIDE)[0] if variant == "decoupled-cfg" else None
    guide_embeddings = load_guide_embeddings() if variant == "decoupled-cfg" else None
    reward = load_reward(REWARDS / "train") if variant.startswith("hfl") else None

    def make_players(rng, data, shard):
        return text_to_image_players(variant, generator, teacher_unet, fake, data, backbone, schedule, rng,
                                     guidance_scale=t.guidance_scale, guide_unet=guide_unet,
                                     guide_embeddings=guide_embeddings, reward=reward,
                                     prompt_dropout=jdm_params.prompt_dropout, shard=shard)

    stage_params = {**section(params, "jdm", "text_to_image", "acceleration"), "jdm": jdm_params.model_dump(mode="json"),
                    "variant": variant}
    ckpt_dir = CHECKPOINTS / f"text-to-image-{variant}"

    def train(log_step) -> int:
        return train_phase(generator, teacher_unet, fake, None, data, backbone, schedule, jdm_params, t.steps,
                           train_unet=True, seed=params.seed, log=log_step,
                           checkpoint=checkpoint_spec(params, ckpt_dir, {**stage_params, "method": variant}),
                           make_players=make_players, frozen=[m for m in (guide_unet, reward) if m is not None],
                           acceleration=params.acceleration)

    state = process_state()
    if not state.is_main_process:  # under `accelerate launch`: train beside the main process, which records
        train(lambda step, values: None)
        return
    with stage_run("text-to-image", params.profile, stage_params, condition="text", tags={"method": variant}) as mlflow:
        start = time.perf_counter()
        resumed_from = train(logger(mlflow))
        mlflow.log_metric("num_processes", state.num_processes)
        metrics = {"train_seconds": time.perf_counter() - start, "steps": t.steps, "resumed_from_step": resumed_from}
        with atomic_dir(TEXT_TO_IMAGE / variant / "generator") as out:
            save_generator(generator, noise_scheduler, out, {k: v for k, v in meta.items() if k != "t_gen"})
        mlflow.log_artifacts(str(TEXT_TO_IMAGE / variant / "generator"), "generator")
        mlflow.log_metrics(metrics)
        write_json({"method": variant, **metrics}, TEXT_TO_IMAGE_METRICS / f"train-{variant}.json")
        log.info(f"text-to-image {variant}: {json.dumps(metrics)}")
    remove_checkpoint(ckpt_dir)


def run_evaluate_text_to_image(params: Params, methods: list[str]) -> None:
    """Table 3's rows: each method's samples for the same held-out prompts (`evaluation.num_samples`, the
    classes in turn), scored by the held-out reward (never trained against: the HPS stand-in), the
    training reward, prompt accuracy (the CLIP-score stand-in), FID and KID against the test split (with
    prompt accuracy, with 95% bootstrap intervals), NFE and latency; one MLflow run per row (stage
    `evaluate`, condition `text`), then reports/text-to-image."""
    from PIL import Image

    from ..annotators.classifier import load_classifier
    from ..errors import UserError
    from ..evaluation import generate, latency_ms, one_step_sampler, score_samples
    from ..metrics import prompt_hits
    from ..models.teacher import build_backbone
    from ..pipeline import load_generator
    from ..report import write_text_to_image_report
    from ..rewards import load_reward

    unknown = [m for m in methods if m not in TEXT_ROWS]
    if unknown:
        raise UserError(f"unknown text-to-image row(s) {', '.join(map(repr, unknown))}; available: {', '.join(TEXT_ROWS)}")
    setup(params)
    e = params.evaluation
    prepared = jdata.PreparedData.load(PREPARED)
    hidden_table, mask_table = prepared.embeddings()
    g = torch.Generator().manual_seed(params.seed)
    pid, classes = jdata.scoring_prompts(prepared, params.data, e.num_samples, g)
    hidden, mask, null = hidden_table[pid], mask_table[pid], (hidden_table[:1], mask_table[:1])
    backbone = build_backbone(params)
    classifier = load_classifier(ANNOTATORS / "classifier")
    device = evaluation_device(params)
    classifier.to(device)
    rewards = {f"reward_{which}": load_reward(REWARDS / which) for which in ("heldout", "train")}
    reference = prepared.split("test").pixels(slice(0, e.fid_reference))
    spaces = spaces_of(params, classifier, reference, device)
    size = params.data.image_size // backbone.factor
    with torch.no_grad():  # the scale of each reward: real test images, the same for every row
        real = {f"{name}_real": reward(reference).mean().item() for name, reward in rewards.items()}
    with stage_run("evaluation", params.profile, section(params, "evaluation"), condition="text",
                   tags={"methods": ",".join(methods)}):  # the parent of one nested run per method
        for method in methods:
            if method == "teacher":
                sampler = teacher_sampler(params, backbone, null, device)
            else:
                generator = load_generator(TEXT_TO_IMAGE / method / "generator", primary=False)[0]
                sampler = one_step_sampler(generator, None, backbone, size, device)
            with stage_run("evaluate", params.profile, section(params, "evaluation"), condition="text",
                           tags={"method": method}) as mlflow:
                start = time.perf_counter()
                samples = generate(sampler, hidden, mask, None, batch_size=e.batch_size, seed=params.seed)
                sample_seconds = time.perf_counter() - start
                with torch.no_grad():  # per sample, so the rewards get intervals over the same resamples as FID
                    per_sample = {"prompt_accuracy": prompt_hits(classifier, samples, classes).float(),
                                  **{name: reward(samples) for name, reward in rewards.items()}}
                metrics = {"nfe": sampler.nfe, "sample_seconds": sample_seconds,
                           "latency_ms": latency_ms(sampler, hidden, mask, None, e.latency_repeats),
                           **score_samples(samples, spaces, per_sample, resamples=e.bootstrap_resamples,
                                           seed=params.seed),
                           **real}
                mlflow.log_metrics(metrics)
                order = torch.argsort(classes[:4 * SAMPLES_SHOWN], stable=True)
                grid = image_grid(samples[:4 * SAMPLES_SHOWN][order], nrow=SAMPLES_SHOWN)
                mlflow.log_image(grid, f"{method}_text_samples.png")
                SAMPLES.mkdir(parents=True, exist_ok=True)
                Image.fromarray(grid).save(SAMPLES / f"{method}-text.png")
                write_json({"method": method, "condition": "text", **metrics}, TEXT_TO_IMAGE_METRICS / f"{method}.json")
                log.info(f"evaluate {method} text: {json.dumps(metrics)}")
    # the table holds every row scored so far, so evaluating one variant (the Prefect flow) refreshes it
    rows = [json.loads(f.read_text()) for f in (TEXT_TO_IMAGE_METRICS / f"{m}.json" for m in TEXT_ROWS) if f.is_file()]
    with stage_run("report", params.profile, section(params, "evaluation"), tags={"table": "text-to-image"}) as mlflow:
        with atomic_dir(TEXT_TO_IMAGE_REPORT) as out:
            write_text_to_image_report(rows, SAMPLES, out, params.profile)
        mlflow.log_artifacts(str(TEXT_TO_IMAGE_REPORT), "report")
        log.info(f"report: {TEXT_TO_IMAGE_REPORT / 'index.html'} ({len(rows)} rows)")

