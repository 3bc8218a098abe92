"""The DVC stages: each reads its sections of params.yaml, calls the library, writes its outputs
atomically, and records one MLflow run. `dvc.yaml` names the same paths."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from . import data as jdata
from .config import Params
from .io import atomic_dir, save_tensors, write_json
from .conditions import condition_slug
from .tracking import image_grid, stage_run

PREPARED = Path("data/prepared")
CONDITIONS = Path("data/conditions")
MODELS = Path("models")
ANNOTATORS = MODELS / "annotators"
TEACHER = MODELS / "teacher"
JDM_MODELS = MODELS / "jdm"
GENERATOR = JDM_MODELS / "generator"
FAKE_SCORE = JDM_MODELS / "fake_score"
CHECKPOINTS = Path("checkpoints")
METRICS = Path("metrics")


def _setup(params: Params) -> None:
    torch.set_num_threads(params.threads or os.cpu_count() or 1)
    torch.manual_seed(params.seed)


def _section(params: Params, *names: str) -> dict:
    dumped = params.model_dump(mode="json")
    return {"seed": params.seed, **{n: dumped[n] for n in names}}


def _logger(mlflow):
    def log(step: int, values: dict) -> None:
        mlflow.log_metrics(values, step=step)
        print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()), flush=True)
    return log


def run_data(params: Params) -> None:
    """Fashion-MNIST at the profile's size, prompts, prompt embeddings, a fixed held-out split."""
    from .text import TextEncoder

    _setup(params)
    p = params.data
    with stage_run("data", params.profile, _section(params, "data", "text_encoder")) as mlflow:
        g = torch.Generator().manual_seed(params.seed)
        prompts, classes = jdata.build_prompts(p.templates)
        splits = {}
        images, labels = jdata.read_fashion_mnist(p.root, "train")
        keep = torch.randperm(len(labels), generator=g)[:p.max_train]
        splits["train"] = (images[keep], labels[keep])
        images, labels = jdata.read_fashion_mnist(p.root, "test")
        order = torch.randperm(len(labels), generator=g)
        splits["test"] = (images[order], labels[order])  # shuffled once: a prefix is a fair FID reference
        splits["eval"] = (images[order[:p.num_eval]], labels[order[:p.num_eval]])
        hidden, mask = TextEncoder(params.text_encoder).encode(prompts)
        with atomic_dir(PREPARED) as out:
            for name, (x, y) in splits.items():
                pid = jdata.assign_prompts(y, len(p.templates), g)
                save_tensors({"images": jdata.resize_images(x, p.image_size), "labels": y, "prompt_ids": pid},
                             out / f"{name}.safetensors")
            save_tensors({"hidden_states": hidden, "attention_mask": mask}, out / "embeddings.safetensors")
            write_json({"prompts": prompts, "prompt_classes": classes, "class_names": list(jdata.CLASS_NAMES)},
                       out / "prompts.json")
        prepared = jdata.PreparedData.load(PREPARED)
        sizes = {f"num_{n}": len(prepared.split(n)) for n in splits}
        mlflow.log_metrics({**sizes, "num_prompts": len(prompts)})
        mlflow.log_image(image_grid(prepared.split("eval").pixels(slice(0, 64))), "eval_images.png")
        print(f"data: {sizes}, {len(prompts)} prompts, embeddings {tuple(hidden.shape)}")


def run_annotator(params: Params, name: str) -> None:
    """hed: port the BSDS500 HED weights; depth: train the MiDaS stand-in; classifier: train it."""
    _setup(params)
    out_dir = ANNOTATORS / name
    p = getattr(params.annotators, name)
    stage_params = {"seed": params.seed, "annotators": {name: p.model_dump(mode="json")}}
    with stage_run(f"annotator-{name}", params.profile, stage_params) as mlflow:
        metrics = {}
        with atomic_dir(out_dir) as out:
            if getattr(p, "source", None) == "controlnet-aux":
                # paper scale: the conditions load controlnet-aux weights from p.path; record which
                write_json({"source": "controlnet-aux", "path": p.path}, out / "source.json")
            elif name == "hed":
                from .annotators.hed import save_hed
                save_hed(out)
            elif name == "depth":
                from .annotators.depth import save_depth_net, train_depth_net
                model, metrics = train_depth_net(steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                                                 size=params.data.image_size, seed=params.seed, log=_logger(mlflow))
                save_depth_net(model, out)
            else:
                from .annotators.classifier import save_classifier, train_classifier
                prepared = jdata.PreparedData.load(PREPARED)
                train, held_out = prepared.split("train"), prepared.split("eval")
                model, metrics = train_classifier(train.images, train.labels, held_out.images, held_out.labels,
                                                  steps=p.steps, batch_size=p.batch_size, lr=p.lr, seed=params.seed,
                                                  log=_logger(mlflow))
                save_classifier(model, out)
        mlflow.log_metrics(metrics)
        write_json(metrics, METRICS / f"annotator-{name}.json")
        print(f"annotator {name}: {metrics}")


def run_conditions(params: Params, name: str) -> None:
    """Exact condition maps for (a prefix of) the train split and the whole eval split."""
    from .conditions import load_condition

    _setup(params)
    cond = load_condition(name, params, MODELS)
    prepared = jdata.PreparedData.load(PREPARED)
    p = params.conditions
    with stage_run("conditions", params.profile, _section(params, "conditions"), condition=name) as mlflow:
        start = time.perf_counter()
        maps = {}
        for split, limit in (("train", p.max_train), ("eval", None)):
            s = prepared.split(split)
            n = len(s) if limit is None else min(limit, len(s))
            chunks = [cond.extract(s.pixels(slice(i, min(n, i + p.batch_size)))) for i in range(0, n, p.batch_size)]
            maps[split] = (torch.cat(chunks).clamp(0, 1) * 255).round().to(torch.uint8)
        with atomic_dir(CONDITIONS / condition_slug(name)) as out:
            save_tensors(maps, out / "maps.safetensors", metadata={"condition": name, "channels": cond.channels})
        seconds = time.perf_counter() - start
        held_out = prepared.split("eval")
        pairs = torch.stack([held_out.pixels(slice(0, 16)).expand(-1, cond.channels, -1, -1),
                             maps["eval"][:16].float() / 255], 1).flatten(0, 1)
        mlflow.log_image(image_grid(pairs, nrow=8), f"{name}_maps.png")
        stats = {"num_train_maps": len(maps["train"]), "num_eval_maps": len(maps["eval"]),
                 "mean_value": maps["eval"].float().mean().item() / 255, "seconds": seconds}
        mlflow.log_metrics(stats)
        print(f"conditions {name}: {stats}")


def load_condition_maps(name: str) -> dict[str, torch.Tensor]:
    """Condition maps as float [N,C,H,W] in [0,1] for the 'train' prefix and the 'eval' split."""
    from .io import load_tensors

    path = CONDITIONS / condition_slug(name) / "maps.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no condition maps at {path}: run `jdm conditions {name}` (or `dvc repro conditions@{name}`)")
    return {k: v.float() / 255 for k, v in load_tensors(path).items()}


def run_teacher(params: Params) -> None:
    """Single process, or several under `accelerate launch`: all train, the main process records and saves."""
    from accelerate import PartialState

    from .models.teacher import build_backbone, save_teacher
    from .training.teacher import train_teacher

    _setup(params)
    p = params.teacher
    # gloo across CPU processes when there is no GPU (torch elastic sets LOCAL_RANK for each process)
    state = PartialState(cpu=not torch.cuda.is_available())
    if not state.is_main_process:
        if not p.pretrained:
            prepared = jdata.PreparedData.load(PREPARED)
            train_teacher(p, prepared.split("train"), prepared.embeddings(), build_backbone(params), seed=params.seed)
        return
    with stage_run("teacher", params.profile, _section(params, "teacher")) as mlflow:
        with atomic_dir(TEACHER) as out:
            if p.pretrained:
                write_json({"pretrained": p.pretrained}, out / "pretrained.json")
                metrics = {}
            else:
                prepared = jdata.PreparedData.load(PREPARED)
                start = time.perf_counter()
                unet, noise_scheduler = train_teacher(p, prepared.split("train"), prepared.embeddings(),
                                                      build_backbone(params), seed=params.seed, log=_logger(mlflow))
                metrics = {"train_seconds": time.perf_counter() - start,
                           "num_parameters": sum(q.numel() for q in unet.parameters()),
                           "num_processes": state.num_processes}
                save_teacher(unet, noise_scheduler, out)
        mlflow.log_metrics(metrics)
        write_json(metrics, METRICS / "teacher-train.json")


def run_evaluate_teacher(params: Params) -> None:
    """Teacher samples (multi-step, CFG): prompt accuracy and FID against the test split."""
    from .annotators.classifier import load_classifier
    from .metrics import FID, ClassifierFeatures, InceptionFeatures, prompt_accuracy
    from .models.teacher import build_backbone, load_teacher
    from .sampling import sample_cfg

    _setup(params)
    e = params.evaluation
    prepared = jdata.PreparedData.load(PREPARED)
    classifier = load_classifier(ANNOTATORS / "classifier")
    with stage_run("evaluate-teacher", params.profile, _section(params, "evaluation")) as mlflow:
        unet, noise_scheduler = load_teacher(TEACHER)
        backbone = build_backbone(params)
        hidden_table, mask_table = prepared.embeddings()
        g = torch.Generator().manual_seed(params.seed)
        classes = torch.arange(e.num_samples) % 10
        pid = jdata.assign_prompts(classes, len(params.data.templates), g)
        size = params.data.image_size // backbone.factor
        start = time.perf_counter()
        samples = []
        for i in range(0, e.num_samples, e.batch_size):
            sl = slice(i, i + e.batch_size)
            x = sample_cfg(unet, noise_scheduler.config, hidden_table[pid[sl]], mask_table[pid[sl]],
                           hidden_table[:1], mask_table[:1], shape=(backbone.channels, size, size),
                           steps=e.num_inference_steps, guidance_scale=e.guidance_scale, sampler=e.sampler, generator=g)
            samples.append(backbone.decode(x))
        samples = torch.cat(samples)
        sample_seconds = time.perf_counter() - start
        test = prepared.split("test")
        reference = test.pixels(slice(0, e.fid_reference))
        metrics = {"prompt_accuracy": prompt_accuracy(classifier, samples, classes),
                   "num_samples": e.num_samples, "num_reference": len(reference),
                   "nfe": e.num_inference_steps * (2 if e.guidance_scale != 1.0 else 1),
                   "sample_seconds": sample_seconds}
        fid = FID(ClassifierFeatures(classifier))
        fid.set_reference(reference)
        metrics["fid_classifier"] = fid(samples)
        if e.inception_fid:
            start = time.perf_counter()
            fid = FID(InceptionFeatures())
            fid.set_reference(reference)
            metrics["fid_inception"] = fid(samples)
            metrics["fid_inception_seconds"] = time.perf_counter() - start
        mlflow.log_metrics(metrics)
        order = torch.argsort(classes[:80], stable=True)
        mlflow.log_image(image_grid(samples[:80][order], nrow=8), "teacher_samples.png")
        write_json(metrics, METRICS / "teacher.json")
        print(f"evaluate-teacher: {json.dumps(metrics)}")


def controlnet_dir(name: str) -> Path:
    return JDM_MODELS / f"controlnet-{condition_slug(name)}"


def _control_data(prepared, name: str):
    """Training and held-out control maps, each with the prompt of the image it came from (read once)."""
    from .training.phases import ControlData

    maps = load_condition_maps(name)
    hidden, mask = prepared.embeddings()
    train_pids = prepared.split("train").prompt_ids[:len(maps["train"])]
    eval_pids = prepared.split("eval").prompt_ids[:len(maps["eval"])]
    return ControlData(maps["train"], train_pids, hidden, mask), ControlData(maps["eval"], eval_pids, hidden, mask)


@torch.no_grad()
def evaluate_control(generator, condition, backbone, held_out, prompt_classes, classifier, num: int, seed: int):
    """One-step samples for `num` held-out control maps (`held_out`: a ControlData): consistency with the
    ControlNet and with it removed, prompt accuracy, and a grid (map | with | without)."""
    from .annotators.classifier import predict
    from .metrics import consistency

    num = min(num, len(held_out.maps))
    maps, pid = held_out.maps[:num], held_out.prompt_ids[:num]
    hidden, mask = held_out.hidden, held_out.mask
    classes = torch.tensor(prompt_classes)[pid]
    g = torch.Generator().manual_seed(seed)
    size = maps.shape[-1] // backbone.factor
    z = torch.randn((num, backbone.channels, size, size), generator=g)
    was_training = generator.training
    generator.eval()
    samples = {}
    for key, controls in (("controlled", {condition.name: maps}), ("uncontrolled", {})):
        samples[key] = torch.cat([backbone.decode(generator(z[i:i + 64], hidden[pid[i:i + 64]], mask[pid[i:i + 64]],
                                                           {k: v[i:i + 64] for k, v in controls.items()}))
                                  for i in range(0, num, 64)])
    metrics = {"num_eval_maps": num,
               "consistency": consistency(condition, samples["controlled"], maps),
               "consistency_without_controlnet": consistency(condition, samples["uncontrolled"], maps),
               "prompt_accuracy": (predict(classifier, samples["controlled"]) == classes).float().mean().item()}
    generator.train(was_training)
    k = min(num, 8)
    show = lambda x: x[:k].expand(-1, 3, -1, -1) if x.shape[1] != 3 else x[:k]  # noqa: E731
    grid = image_grid(torch.cat([show(maps), show(samples["controlled"]), show(samples["uncontrolled"])]), nrow=k)
    return metrics, grid


def _phase_settings(params: Params, stage: str, condition: str) -> dict:
    """What a checkpoint must agree with to be resumed: this stage's params and the condition."""
    return {**_section(params, "jdm", stage, "teacher", "conditions"), "condition": condition}


def run_jdm_phase(params: Params, name: str, phase: str) -> None:
    """`warmup` (phase 1: generator UNet + the primary ControlNet) or `extend` (phase 2: a new
    ControlNet on the frozen generator). Both train with the JDM objective, checkpoint and resume,
    save diffusers folders, and score the control on held-out maps."""
    from .annotators.classifier import load_classifier
    from .conditions import load_condition
    from .models.fake_score import build_fake_score, load_fake_score, save_fake_score
    from .models.teacher import build_backbone, load_teacher
    from .objectives import VPSchedule
    from .pipeline import load_generator, save_controlnet, save_generator
    from .training.checkpoint import remove_checkpoint
    from .training.phases import build_generator, train_phase

    _setup(params)
    p = params.jdm
    condition = load_condition(name, params, MODELS)
    prepared = jdata.PreparedData.load(PREPARED)
    data, held_out = _control_data(prepared, name)
    condition.check_map(data.maps[:1], params.data.image_size)
    classifier = load_classifier(ANNOTATORS / "classifier")
    teacher_unet, noise_scheduler = load_teacher(TEACHER)
    schedule = VPSchedule.from_scheduler(noise_scheduler)
    backbone = build_backbone(params)
    if phase == "warmup":
        steps, shared_unet = params.warmup.steps, None
        fake, lora = build_fake_score(teacher_unet, p.lora_rank)
    else:
        steps = params.extend.steps
        shared_unet = load_generator(GENERATOR, primary=False)[0].unet
        # the warm-up's fake score already models this generator's distribution: start from it
        fake, lora = load_fake_score(FAKE_SCORE, p.lora_rank)
    generator = build_generator(teacher_unet, schedule, condition, backbone, p.t_gen, unet=shared_unet)
    unet_before = {k: v.clone() for k, v in generator.unet.state_dict().items()} if shared_unet is not None else None
    stage_params = _section(params, "jdm", phase)
    ckpt_dir = CHECKPOINTS / (phase if phase == "warmup" else f"extend-{condition_slug(name)}")
    with stage_run(phase, params.profile, stage_params, condition=name) as mlflow:
        start = time.perf_counter()
        resumed_from = train_phase(generator, teacher_unet, fake, lora, condition, data, backbone, schedule, p, steps,
                             train_unet=shared_unet is None, seed=params.seed, checkpoint_dir=ckpt_dir,
                             settings=_phase_settings(params, phase, name), log=_logger(mlflow),
                             evaluate=lambda: {f"eval_{k}": v for k, v in evaluate_control(
                                 generator, condition, backbone, held_out, prepared.prompt_classes, classifier, 64,
                                 params.seed)[0].items() if k != "num_eval_maps"})
        train_seconds = time.perf_counter() - start
        metrics, grid = evaluate_control(generator, condition, backbone, held_out, prepared.prompt_classes, classifier,
                                         p.eval_samples, params.seed)
        metrics.update(train_seconds=train_seconds, steps=steps, resumed_from_step=resumed_from)
        if unet_before is not None:
            # phase 2 must not touch the shared generator: checked on every run, not assumed
            same = all(torch.equal(unet_before[k], v) for k, v in generator.unet.state_dict().items())
            if not same:
                raise RuntimeError("the frozen generator UNet changed during the extension phase")
            metrics["generator_unchanged"] = 1.0
        if phase == "warmup":
            meta = {"image_size": params.data.image_size, "image_channels": backbone.image_channels,
                    "vae": params.teacher.pretrained, "primary_condition": name,
                    "text_encoder": params.text_encoder.model_dump(mode="json")}
            with atomic_dir(GENERATOR) as out:
                save_generator(generator, noise_scheduler, out, meta)
            with atomic_dir(FAKE_SCORE) as out:
                save_fake_score(fake, out)
            metrics_file = METRICS / "warmup.json"
            mlflow.log_artifacts(str(GENERATOR), "generator")
        else:
            with atomic_dir(controlnet_dir(name)) as out:
                save_controlnet(generator.controlnet(condition.name), name, out)
            metrics_file = METRICS / f"extend-{condition_slug(name)}.json"
            mlflow.log_artifacts(str(controlnet_dir(name)), "controlnet")
        mlflow.log_metrics(metrics)
        mlflow.log_image(grid, f"{condition_slug(name)}_map_controlled_uncontrolled.png")
        write_json({"condition": name, **metrics}, metrics_file)
        print(f"{phase} {name}: {json.dumps(metrics)}")
    remove_checkpoint(ckpt_dir)  # the outputs are saved: the checkpoint has done its job
