"""The DVC stages: each reads its sections of params.yaml, calls the library, writes its outputs
atomically, and records one MLflow run. `dvc.yaml` names the same paths."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as jdata
from .config import Params
from .io import atomic_dir, save_tensors, write_json
from .conditions import condition_slug
from .tracking import image_grid, stage_run
from .training.checkpoint import remove_checkpoint

PREPARED = Path("data/prepared")
CONDITIONS = Path("data/conditions")
MODELS = Path("models")
ANNOTATORS = MODELS / "annotators"
TEACHER = MODELS / "teacher"
JDM_MODELS = MODELS / "jdm"
BASELINES = MODELS / "baselines"
REFERENCE = Path("data/reference")
CHECKPOINTS = Path("checkpoints")
METRICS = Path("metrics")


def _setup(params: Params) -> None:
    torch.set_num_threads(params.threads or os.cpu_count() or 1)
    torch.manual_seed(params.seed)


def _section(params: Params, *names: str) -> dict:
    dumped = params.model_dump(mode="json")
    return {"seed": params.seed, **{n: dumped[n] for n in names}}


def _checkpoint(params: Params, directory: Path, settings: dict):
    from .training.checkpoint import CheckpointSpec
    return CheckpointSpec(directory, settings, params.checkpoint.every, params.checkpoint.keep)


def _logger(mlflow):
    def log(step: int, values: dict) -> None:
        mlflow.log_metrics(values, step=step)
        print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()), flush=True)
    return log


def _recording(log, curve: list):
    """`log` that also keeps each validation record (the `eval_*` values) in `curve`, for a DVC plot."""
    def record(step: int, values: dict) -> None:
        log(step, values)
        if any(k.startswith("eval_") for k in values):
            curve.append({"step": step, **values})
    return record


def _curve_path(metrics_file: Path) -> Path:
    """metrics/<x>.json -> metrics/curves/<x>.json (baselines: metrics/curves/baselines/<x>.json)."""
    return METRICS / "curves" / metrics_file.relative_to(METRICS)


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


def run_judge(params: Params, name: str) -> None:
    """depth: train the second depth stand-in that scores consistency beside the conditions' own
    (judges.py). The hed judge has no weights and so no stage."""
    from .annotators.depth import save_depth_net, train_depth_net
    from .errors import UserError
    from .judges import judge_path

    if name != "depth":
        raise UserError(f"no judge to train for {name!r}; allowed: depth (the hed judge has no weights)")
    _setup(params)
    p = params.judges.depth
    with stage_run(f"judge-{name}", params.profile, {"judges": {name: p.model_dump(mode="json")}}) as mlflow:
        with atomic_dir(judge_path(MODELS, name)) as out:
            model, metrics = train_depth_net(steps=p.steps, batch_size=p.batch_size, lr=p.lr, size=params.data.image_size,
                                             seed=p.seed, channels=tuple(p.channels), log=_logger(mlflow))
            save_depth_net(model, out)
        mlflow.log_metrics(metrics)
        write_json(metrics, METRICS / f"judge-{name}.json")
        print(f"judge {name}: {metrics}")


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
    checkpoint = _checkpoint(params, CHECKPOINTS / "teacher", _section(params, "teacher", "acceleration"))
    if not state.is_main_process:
        if not p.pretrained:
            prepared = jdata.PreparedData.load(PREPARED)
            train_teacher(p, prepared.split("train"), prepared.embeddings(), build_backbone(params), seed=params.seed,
                          checkpoint=checkpoint, acceleration=params.acceleration)
        return
    with stage_run("teacher", params.profile, _section(params, "teacher", "acceleration")) as mlflow:
        with atomic_dir(TEACHER) as out:
            if p.pretrained:
                write_json({"pretrained": p.pretrained}, out / "pretrained.json")
                metrics = {}
            else:
                prepared = jdata.PreparedData.load(PREPARED)
                start = time.perf_counter()
                unet, noise_scheduler = train_teacher(p, prepared.split("train"), prepared.embeddings(),
                                                      build_backbone(params), seed=params.seed, log=_logger(mlflow),
                                                      checkpoint=checkpoint, acceleration=params.acceleration)
                metrics = {"train_seconds": time.perf_counter() - start,
                           "num_parameters": sum(q.numel() for q in unet.parameters()),
                           "num_processes": state.num_processes}
                save_teacher(unet, noise_scheduler, out)
        mlflow.log_metrics(metrics)
        write_json(metrics, METRICS / "teacher-train.json")
    remove_checkpoint(checkpoint.directory)  # the outputs are saved: the checkpoint has done its job


def run_evaluate_teacher(params: Params) -> None:
    """Teacher samples (multi-step, CFG): prompt accuracy, FID and KID against the test split, with intervals."""
    from .annotators.classifier import load_classifier
    from .evaluation import score_samples
    from .metrics import prompt_hits
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
        start = time.perf_counter()
        spaces = _spaces_of(params, classifier, prepared.split("test").pixels(slice(0, e.fid_reference)))
        metrics = {"nfe": e.num_inference_steps * (2 if e.guidance_scale != 1.0 else 1), "sample_seconds": sample_seconds,
                   **score_samples(samples, spaces, {"prompt_accuracy": prompt_hits(classifier, samples, classes).float()},
                                   resamples=e.bootstrap_resamples, seed=params.seed)}
        metrics["score_seconds"] = time.perf_counter() - start
        mlflow.log_metrics(metrics)
        order = torch.argsort(classes[:80], stable=True)
        mlflow.log_image(image_grid(samples[:80][order], nrow=8), "teacher_samples.png")
        write_json(metrics, METRICS / "teacher.json")
        print(f"evaluate-teacher: {json.dumps(metrics)}")


def _control_data(prepared, name: str, with_images: bool = False):
    """Training and held-out control maps, each with the prompt of the image it came from (read once);
    `with_images` adds the training images themselves (the denoising baselines train on them). The
    held-out maps always carry their images: the validation curves' FID is taken against them."""
    from .training.phases import ControlData

    maps = load_condition_maps(name)
    hidden, mask = prepared.embeddings()
    train, held_out = prepared.split("train"), prepared.split("eval")
    n, n_eval = len(maps["train"]), len(maps["eval"])
    images = train.pixels(slice(0, n)) if with_images else None
    return (ControlData(maps["train"], train.prompt_ids[:n], hidden, mask, images),
            ControlData(maps["eval"], held_out.prompt_ids[:n_eval], hidden, mask, held_out.pixels(slice(0, n_eval))))


@torch.no_grad()
def validate(generator, condition, backbone, held_out, prompt_classes, classifier, num: int, seed: int):
    """One-step samples for the *last* `num` held-out maps (the validation maps; the table reads the
    first `evaluation.control_samples`, config.py keeps them apart): prompt accuracy, FID and KID in
    the classifier's features against the maps' own images, and, when the generator has the
    condition's ControlNet, consistency with it and with it removed. Returns (metrics, grid of
    map | controlled | uncontrolled, or the uncontrolled samples alone)."""
    from .annotators.classifier import predict
    from .metrics import ClassifierFeatures, consistency, features, fid, kid

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
    show = lambda x: x[:k].expand(-1, 3, -1, -1) if x.shape[1] != 3 else x[:k]  # noqa: E731
    rows = [maps, samples["controlled"], samples["uncontrolled"]] if controlled else [samples["uncontrolled"]]
    return metrics, image_grid(torch.cat([show(x) for x in rows]), nrow=k)


def _phase_settings(params: Params, stage: str, condition: str, method: str) -> dict:
    """What a checkpoint must agree with to be resumed: this stage's params, the condition, the method."""
    return {**_section(params, "jdm", stage, "teacher", "conditions", "acceleration"), "condition": condition,
            "method": method}


@dataclass(frozen=True)
class Variant:
    """A model trained by the warm-up phases' machinery: JDM itself, or a baseline that changes one thing.
    Phase 1 writes <root>/generator and <root>/fake_score; phase 2 writes <root>/controlnet-<c>,
    starting from the frozen generator and fake score in <source>. A variant with `own_warmup` runs its
    own phase 1, whose ControlNet is its row for the warm-up's condition, as JDM's is."""

    method: str
    root: Path
    source: Path = JDM_MODELS
    overrides: tuple = ()           # jdm params changed, (key, value) pairs
    with_controlnet: bool = True
    own_warmup: bool = False


VARIANTS = {
    "jdm": Variant("jdm", JDM_MODELS, own_warmup=True),
    # Diff-Instruct: the one-step student of plain score distillation (no condition term, no ControlNet)
    "di": Variant("di", BASELINES / "di", overrides=(("condition_weight", 0.0),), with_controlnet=False,
                  own_warmup=True),
    # Eq. 12: a ControlNet trained by the plain VSD/DI loss on the DI generator: nothing asks it to obey c
    "implicit": Variant("implicit", BASELINES / "implicit", source=BASELINES / "di", overrides=(("condition_weight", 0.0),)),
    # ablation: the extension phase on the DI generator instead of the jointly warmed-up one
    "wo-warmup": Variant("wo-warmup", BASELINES / "wo-warmup", source=BASELINES / "di"),
    # ablation: the condition gradient from log p(c | x) on the generator output, not via f(x_t, t), in
    # both phases: its own warm-up too, so no row of it inherits a generator trained with the modelling
    "wo-modelling": Variant("wo-modelling", BASELINES / "wo-modelling", source=BASELINES / "wo-modelling",
                            overrides=(("condition_on_x", True),), own_warmup=True),
}


def variant_phase(params: Params, method: str, name: str) -> str:
    """`warmup` for a variant's own phase 1 (DI's, whatever the condition; the others' on the warm-up's
    condition), else `extend`."""
    v = VARIANTS[method]
    own_phase1 = v.own_warmup and (not v.with_controlnet or name == params.warmup.condition)
    return "warmup" if own_phase1 else "extend"


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
    from .annotators.classifier import load_classifier
    from .conditions import load_condition
    from .models.fake_score import build_fake_score, load_fake_score, save_fake_score
    from .models.teacher import build_backbone, load_teacher
    from .objectives import VPSchedule
    from .pipeline import load_generator, save_controlnet, save_generator
    from .training.phases import build_generator, train_phase

    _setup(params)
    v = VARIANTS[method]
    p = params.jdm.model_copy(update=dict(v.overrides))
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
        fake, _ = build_fake_score(teacher_unet, p.lora_rank)
    else:
        # a ControlNet for the warm-up's own condition (Eq. 12 and w/o warm-up on canny) trains as long as
        # JDM's phase 1 trained its: the rows compared differ in the method, not in the budget
        steps = params.warmup.steps if name == params.warmup.condition else params.extend.steps
        shared_unet = load_generator(v.source / "generator", primary=False)[0].unet
        # the warm-up's fake score already models this generator's distribution: start from it
        fake, _ = load_fake_score(v.source / "fake_score", p.lora_rank)
    generator = build_generator(teacher_unet, schedule, condition, backbone, p.t_gen, unet=shared_unet,
                                with_controlnet=v.with_controlnet)
    unet_before = {k: v.clone() for k, v in generator.unet.state_dict().items()} if shared_unet is not None else None
    stage_params = {**_section(params, "jdm", phase, "acceleration"), "jdm": p.model_dump(mode="json")}
    stage, metrics_file, ckpt_dir = _variant_paths(v, phase, name)
    curve = []  # the validation scores against the step: MLflow's metric history and a DVC plot

    def evaluate():
        scores = validate(generator, condition, backbone, held_out, prepared.prompt_classes, classifier,
                          p.eval_samples, params.seed)[0]
        return {f"eval_{k}": val for k, val in scores.items() if k != "num_eval_maps"}

    with stage_run(stage, params.profile, stage_params, condition=name, tags={"method": method}) as mlflow:
        log_step = _recording(_logger(mlflow), curve)
        start = time.perf_counter()
        resumed_from = train_phase(generator, teacher_unet, fake, condition, data, backbone, schedule, p, steps,
                                   train_unet=shared_unet is None, seed=params.seed, log=log_step,
                                   checkpoint=_checkpoint(params, ckpt_dir, _phase_settings(params, phase, name, method)),
                                   evaluate=evaluate, acceleration=params.acceleration)
        metrics = {"train_seconds": time.perf_counter() - start, "steps": steps, "resumed_from_step": resumed_from}
        scores, grid = validate(generator, condition, backbone, held_out, prepared.prompt_classes, classifier,
                                p.eval_samples, params.seed)
        metrics.update(scores)
        mlflow.log_image(grid, f"{condition_slug(name)}_validation.png")
        write_json(curve, _curve_path(metrics_file))
        if unet_before is not None:
            # phase 2 must not touch the shared generator: checked on every run, not assumed
            same = all(torch.equal(unet_before[k], val) for k, val in generator.unet.state_dict().items())
            if not same:
                raise RuntimeError("the frozen generator UNet changed during the extension phase")
            metrics["generator_unchanged"] = 1.0
        if phase == "warmup":
            meta = {"image_size": params.data.image_size, "image_channels": backbone.image_channels,
                    "vae": params.teacher.pretrained, "primary_condition": name if v.with_controlnet else None,
                    "text_encoder": params.text_encoder.model_dump(mode="json")}
            with atomic_dir(v.root / "generator") as out:
                save_generator(generator, noise_scheduler, out, meta)
            with atomic_dir(v.root / "fake_score") as out:
                save_fake_score(fake, out)
            mlflow.log_artifacts(str(v.root / "generator"), "generator")
        else:
            out_dir = v.root / f"controlnet-{condition_slug(name)}"
            with atomic_dir(out_dir) as out:
                save_controlnet(generator.controlnet(condition.name), name, out)
            mlflow.log_artifacts(str(out_dir), "controlnet")
        mlflow.log_metrics(metrics)
        write_json({"condition": name, "method": method, **metrics}, metrics_file)
        print(f"{stage} {name}: {json.dumps(metrics)}")
    remove_checkpoint(ckpt_dir)  # the outputs are saved: the checkpoint has done its job


# --- baselines trained by denoising on data (jdm/training/controlnet.py) -------------------------------

CONTROLNET_BASELINES = {"controlnet-50": BASELINES / "controlnet-50",  # on the teacher, sampled with 50 steps + CFG
                        "denoising": BASELINES / "denoising"}          # Eq. 11, on the frozen DI generator


def run_controlnet_baseline(params: Params, name: str, method: str) -> None:
    """`controlnet-50`: a ControlNet trained by denoising on the teacher (params `controlnet`);
    `denoising`: one trained by Eq. 11 through the frozen Diff-Instruct generator (params `baselines`)."""
    from .conditions import load_condition
    from .models.generator import controlnet_from_unet
    from .models.teacher import build_backbone, load_teacher
    from .pipeline import load_generator, save_controlnet
    from .training.controlnet import generator_regression_loss, teacher_loss, train_controlnet

    _setup(params)
    condition = load_condition(name, params, MODELS)
    prepared = jdata.PreparedData.load(PREPARED)
    data, _ = _control_data(prepared, name, with_images=True)
    condition.check_map(data.maps[:1], params.data.image_size)
    backbone = build_backbone(params)
    if method == "controlnet-50":
        unet, noise_scheduler = load_teacher(TEACHER)
        loss, frozen = teacher_loss(unet, noise_scheduler, params.teacher.snr_gamma), unet
        c = params.controlnet
        settings = {"steps": c.steps, "batch_size": c.batch_size, "lr": c.lr, "prompt_dropout": c.prompt_dropout}
        section = "controlnet"
    else:
        generator = load_generator(VARIANTS["di"].root / "generator", primary=False)[0]
        unet, loss, frozen = generator.unet, generator_regression_loss(generator), generator
        b = params.baselines
        settings = {"steps": b.denoising_steps, "batch_size": b.denoising_batch_size, "lr": b.denoising_lr,
                    "prompt_dropout": 0.0}
        section = "baselines"
    controlnet = controlnet_from_unet(unet, condition.channels, backbone.factor)
    out_dir = CONTROLNET_BASELINES[method] / f"controlnet-{condition_slug(name)}"
    with stage_run(method, params.profile, _section(params, section, "acceleration"), condition=name,
                   tags={"method": method}) as mlflow:
        start = time.perf_counter()
        checkpoint = _checkpoint(params, CHECKPOINTS / f"{method}-{condition_slug(name)}",
                                 {**_section(params, section, "acceleration"), "condition": name, "method": method})
        controlnet = train_controlnet(controlnet, loss, data, backbone, seed=params.seed, log=_logger(mlflow),
                                      checkpoint=checkpoint, frozen=[frozen], acceleration=params.acceleration,
                                      **settings)
        metrics = {"train_seconds": time.perf_counter() - start, "steps": settings["steps"]}
        with atomic_dir(out_dir) as out:
            save_controlnet(controlnet, name, out)
        mlflow.log_artifacts(str(out_dir), "controlnet")
        mlflow.log_metrics(metrics)
        write_json({"condition": name, "method": method, **metrics},
                   METRICS / "baselines" / f"{method}-{condition_slug(name)}.json")
        print(f"{method} {name}: {json.dumps(metrics)}")
    remove_checkpoint(checkpoint.directory)


# --- the comparison table -----------------------------------------------------------------------------

# method -> (folder of the one-step generator, or None for the teacher sampled with 50 steps + CFG;
#            folder holding controlnet-<c>)
METHODS = {
    "jdm": (JDM_MODELS, JDM_MODELS),
    "controlnet-50": (None, CONTROLNET_BASELINES["controlnet-50"]),
    "di-controlnet": (VARIANTS["di"].root, CONTROLNET_BASELINES["controlnet-50"]),  # the teacher's ControlNet
    "denoising": (VARIANTS["di"].root, CONTROLNET_BASELINES["denoising"]),
    "implicit": (VARIANTS["di"].root, VARIANTS["implicit"].root),
    "wo-warmup": (VARIANTS["di"].root, VARIANTS["wo-warmup"].root),
    "wo-modelling": (VARIANTS["wo-modelling"].root, VARIANTS["wo-modelling"].root),
}
SAMPLES = Path("reports/samples")
SAMPLES_SHOWN = 8


def _held_out(params: Params, prepared, name: str | None = None):
    """The first `evaluation.control_samples` held-out images: prompt embeddings, classes, and maps of `name`."""
    n = params.evaluation.control_samples
    held_out = prepared.split("eval")
    n = min(n, len(held_out))
    pid = held_out.prompt_ids[:n]
    hidden, mask = prepared.embeddings()
    maps = load_condition_maps(name)["eval"][:n] if name is not None else None
    return hidden[pid], mask[pid], torch.tensor(prepared.prompt_classes)[pid], maps, (hidden[:1], mask[:1])


def _held_out_images(params: Params, prepared) -> torch.Tensor:
    """The real images of `_held_out`'s maps, in [0,1]."""
    return prepared.split("eval").pixels(slice(0, params.evaluation.control_samples))


def _feature_nets(params: Params, classifier) -> dict:
    """The feature spaces FID and KID are computed in: the classifier's, and Inception's when on."""
    from .metrics import ClassifierFeatures, InceptionFeatures

    nets = {"classifier": ClassifierFeatures(classifier)}
    if params.evaluation.inception_fid:
        nets["inception"] = InceptionFeatures()
    return nets


def _spaces_of(params: Params, classifier, reference: torch.Tensor) -> dict:
    """Each feature space with the features of `reference` (images in [0,1])."""
    from .evaluation import FeatureSpace
    from .metrics import features

    return {name: FeatureSpace(net, features(net, reference)) for name, net in _feature_nets(params, classifier).items()}


def _saved_spaces(params: Params, classifier) -> dict:
    """Each feature space with the table's reference features, as the reference stage saved them."""
    from .errors import UserError
    from .evaluation import FeatureSpace
    from .io import load_tensors

    path = REFERENCE / "features.safetensors"
    saved = load_tensors(path)
    nets = _feature_nets(params, classifier)
    missing = [name for name in nets if name not in saved]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)} features (it has {', '.join(saved) or 'none'}): "
                        "run `jdm reference` again (DVC: the reference stage)")
    return {name: FeatureSpace(net, saved[name].numpy()) for name, net in nets.items()}


def _teacher_sampler(params: Params, backbone, null, controlnet=None):
    from .evaluation import multi_step_sampler
    from .models.teacher import load_teacher

    e = params.evaluation
    unet, noise_scheduler = load_teacher(TEACHER)
    return multi_step_sampler(unet, noise_scheduler.config, backbone, params.data.image_size // backbone.factor, null,
                              steps=e.num_inference_steps, guidance_scale=e.guidance_scale, sampler=e.sampler,
                              controlnet=controlnet)


def run_reference(params: Params) -> None:
    """The FID reference of the table: the teacher's samples *without* control for the prompts of the
    held-out maps, and their features in each space, computed once for every method and condition."""
    from .annotators.classifier import load_classifier
    from .evaluation import reference_samples
    from .models.teacher import build_backbone

    _setup(params)
    prepared = jdata.PreparedData.load(PREPARED)
    hidden, mask, _, _, null = _held_out(params, prepared)
    backbone = build_backbone(params)
    classifier = load_classifier(ANNOTATORS / "classifier")
    with stage_run("reference", params.profile, _section(params, "evaluation")) as mlflow:
        start = time.perf_counter()
        samples = reference_samples(_teacher_sampler(params, backbone, null), hidden, mask,
                                    batch_size=params.evaluation.batch_size, seed=params.seed)
        sample_seconds = time.perf_counter() - start
        spaces = _spaces_of(params, classifier, samples)
        with atomic_dir(REFERENCE) as out:
            save_tensors({name: torch.from_numpy(space.reference) for name, space in spaces.items()},
                         out / "features.safetensors")
            save_tensors({"samples": (samples * 255).round().to(torch.uint8)}, out / "samples.safetensors")
        metrics = {"num_samples": len(samples), "sample_seconds": sample_seconds,
                   "feature_seconds": time.perf_counter() - start - sample_seconds}
        mlflow.log_metrics(metrics)
        mlflow.log_image(image_grid(samples[:64]), "reference_samples.png")
        print(f"reference: {json.dumps(metrics)}")


def _method_sampler(params: Params, method: str, name: str, backbone, null):
    from .evaluation import one_step_sampler
    from .pipeline import load_controlnet, load_generator

    generator_root, controlnet_root = METHODS[method]
    path = controlnet_root / f"controlnet-{condition_slug(name)}"
    if generator_root is None:
        return _teacher_sampler(params, backbone, null, controlnet=load_controlnet(path)[1])
    generator, _, _ = load_generator(generator_root / "generator", primary=True)
    # the method's own ControlNet, unless it is the generator's primary one (the warm-up condition's row of
    # JDM and w/o modelling); on the DI generator, which has none, every row loads its own
    if controlnet_root != generator_root or name not in generator.names:
        generator, _, _ = load_generator(generator_root / "generator", {name: path}, primary=False)
    return one_step_sampler(generator, name, backbone, params.data.image_size // backbone.factor)


def run_evaluate(params: Params, methods: list[str], name: str) -> None:
    """Rows of the table for condition `name`: each method sampled on the same held-out maps and
    prompts, scored the same way; one MLflow run per method (tags `method`, `condition`)."""
    from PIL import Image

    from .annotators.classifier import load_classifier
    from .conditions import load_condition
    from .errors import UserError
    from .evaluation import generate, latency_ms, score
    from .judges import load_judge
    from .models.teacher import build_backbone

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(map(repr, unknown))}; available: {', '.join(METHODS)}")
    _setup(params)
    condition = load_condition(name, params, MODELS)
    prepared = jdata.PreparedData.load(PREPARED)
    hidden, mask, classes, maps, null = _held_out(params, prepared, name)
    backbone = build_backbone(params)
    classifier = load_classifier(ANNOTATORS / "classifier")
    spaces = _saved_spaces(params, classifier)
    judge = load_judge(name, params, MODELS)
    real = _held_out_images(params, prepared) if judge is not None else None
    slug = condition_slug(name)
    for method in methods:
        sampler = _method_sampler(params, method, name, backbone, null)
        with stage_run("evaluate", params.profile, _section(params, "evaluation"), condition=name,
                       tags={"method": method}) as mlflow:
            start = time.perf_counter()
            samples = generate(sampler, hidden, mask, maps, batch_size=params.evaluation.batch_size, seed=params.seed)
            sample_seconds = time.perf_counter() - start
            metrics = {"nfe": sampler.nfe, "sample_seconds": sample_seconds,
                       "latency_ms": latency_ms(sampler, hidden, mask, maps, params.evaluation.latency_repeats),
                       **score(samples, maps, classes, condition, classifier, spaces,
                               resamples=params.evaluation.bootstrap_resamples, seed=params.seed,
                               judge=judge, real=real)}
            mlflow.log_metrics(metrics)
            grid = image_grid(samples[:SAMPLES_SHOWN], nrow=SAMPLES_SHOWN)  # make_grid turns gray into RGB
            mlflow.log_image(grid, f"{method}_{slug}_samples.png")
            SAMPLES.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(SAMPLES / f"{method}-{slug}.png")
            write_json({"method": method, "condition": name, **metrics}, METRICS / "eval" / f"{method}-{slug}.json")
            print(f"evaluate {method} {name}: {json.dumps(metrics)}", flush=True)


def run_report(params: Params, methods: list[str], conditions: list[str], out_dir: Path) -> None:
    """The table (Markdown and HTML, the paper's numbers beside ours) and sample grids per condition."""
    from .io import load_tensors
    from .report import write_report

    _setup(params)
    rows = []
    for method in methods:
        for name in conditions:
            path = METRICS / "eval" / f"{method}-{condition_slug(name)}.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run `jdm evaluate {name} --methods {method}` "
                                        f"(DVC: the evaluate stage of condition {name!r})")
            rows.append(json.loads(path.read_text()))
    prepared = jdata.PreparedData.load(PREPARED)
    teacher = load_tensors(REFERENCE / "samples.safetensors")["samples"][:SAMPLES_SHOWN].float() / 255
    pictures = {"teacher": image_grid(teacher, nrow=SAMPLES_SHOWN)}
    for name in conditions:
        maps = _held_out(params, prepared, name)[3][:SAMPLES_SHOWN]
        pictures[f"maps-{condition_slug(name)}"] = image_grid(maps, nrow=SAMPLES_SHOWN)
    with stage_run("report", params.profile, _section(params, "evaluation")) as mlflow:
        with atomic_dir(out_dir) as out:
            write_report(rows, methods, [condition_slug(c) for c in conditions], pictures, SAMPLES, out, params.profile)
        mlflow.log_artifacts(str(out_dir), "report")
        print(f"report: {out_dir / 'index.html'} ({len(rows)} rows)")


def run_seeds_report(params: Params, offsets: list[int], out_dir: Path) -> None:
    """The headline rows (JDM, ControlNet-50) of `make run`'s seed and of each extra seed (seeds/<k>/):
    metrics/seeds.json and reports/seeds/table.md, mean and std per cell and each claim seed by seed."""
    from .report import seeds_summary, write_seeds_report

    methods, conditions = ["jdm", "controlnet-50"], ["canny", "hed", "depth", "sr"]
    rows_by_seed = {}
    for offset in [0, *offsets]:
        root = Path(".") if offset == 0 else Path("seeds") / str(offset)
        rows = []
        for method in methods:
            for name in conditions:
                path = root / METRICS / "eval" / f"{method}-{name}.json"
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: run `dvc repro seeds/dvc.yaml` (seed offset {offset})"
                                            if offset else f"{path} is missing: run `dvc repro` (make run) first")
                rows.append(json.loads(path.read_text()))
        rows_by_seed[params.seed + offset] = rows
    summary = seeds_summary(rows_by_seed)
    with stage_run("seeds-report", params.profile, _section(params, "evaluation")) as mlflow:
        with atomic_dir(out_dir) as out:
            write_seeds_report(summary, methods, conditions, out, params.profile)
        write_json(summary, METRICS / "seeds.json")
        mlflow.log_metrics({f"{name}_holds_on": claim["holds_on"] for name, claim in summary["claims"].items()})
        mlflow.log_artifacts(str(out_dir), "report")
        print((out_dir / "table.md").read_text())


# --- Table 3: one-step text-to-image with human feedback or decoupled CFG (paper/dvc.yaml) ----------------

REWARDS = MODELS / "rewards"
GUIDE = MODELS / "guide"
TEXT_TO_IMAGE = MODELS / "text-to-image"
TEXT_TO_IMAGE_REPORT = Path("reports/text-to-image")
TEXT_TO_IMAGE_METRICS = METRICS / "text-to-image"
TEXT_ROWS = ("teacher",) + ("di", "coupled-cfg", "hfl", "decoupled-cfg", "hfl-on-x")  # Table 3's rows, in order


def run_reward(params: Params, which: str) -> None:
    """A reward stand-in (jdm/rewards.py) trained by Bradley-Terry on (real, degraded) pairs from one half
    of the train split; `train` gives HFL its gradient, `heldout` only scores. Preference accuracy is
    measured on the held-out (test) split."""
    from .rewards import preference_accuracy, save_reward, train_reward

    _setup(params)
    r = params.rewards
    model_params = getattr(r, which)
    train = jdata.PreparedData.load(PREPARED).split("train")
    half = len(train) // 2
    images = train.images[:half] if model_params.half == "first" else train.images[half:]
    held_out = jdata.PreparedData.load(PREPARED).split("eval").images
    with stage_run("reward", params.profile, {**_section(params, "rewards"), "which": which},
                   tags={"reward": which}) as mlflow:
        start = time.perf_counter()
        model = train_reward(images, steps=r.steps, batch_size=r.batch_size, lr=r.lr, seed=model_params.seed,
                             width=model_params.width, log=_logger(mlflow))
        metrics = {"train_seconds": time.perf_counter() - start, "num_train_images": len(images),
                   "num_parameters": sum(q.numel() for q in model.parameters()),
                   **preference_accuracy(model, held_out, seed=params.seed)}
        with atomic_dir(REWARDS / which) as out:
            save_reward(model, out, metrics)
        mlflow.log_metrics(metrics)
        write_json({"reward": which, **metrics}, METRICS / "rewards" / f"{which}.json")
        print(f"reward {which}: {json.dumps(metrics)}")


def _heldout_denoising_loss(unet, noise_scheduler, prepared, backbone, seed: int, embeddings=None,
                            num: int = 512) -> float:
    """Plain epsilon MSE on held-out images (encoded by the backbone), the same noise and timesteps for
    every model scored; `embeddings` the prompt table the model reads (default: the teacher's)."""
    from .training.teacher import denoising_loss

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
    from .errors import UserError

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
    from .errors import UserError
    from .models.teacher import build_backbone, load_teacher, save_teacher
    from .text import TextEncoder
    from .training.teacher import train_teacher

    _setup(params)
    g = params.guide
    if params.teacher.pretrained and not g.pretrained:
        raise UserError("guide.pretrained is empty but the teacher is pretrained: name the guidance model's "
                        "pipeline (a local dir or hub id; sd15: stable-diffusion-2-1-base); the guide stage trains "
                        "a guide only from a teacher it trained itself")
    settings = params.teacher.model_copy(update={"steps": g.steps, "lr": g.lr, "warmup_steps": g.warmup_steps})
    prepared = jdata.PreparedData.load(PREPARED)
    backbone = build_backbone(params)
    teacher_unet, teacher_scheduler = load_teacher(TEACHER)
    embeddings = TextEncoder(g.text_encoder).encode(prepared.prompts) if g.text_encoder else None
    checkpoint = _checkpoint(params, CHECKPOINTS / "guide", _section(params, "teacher", "guide", "acceleration"))
    with stage_run("guide", params.profile, _section(params, "teacher", "guide", "acceleration")) as mlflow:
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
                                                      backbone, seed=params.seed + 1, log=_logger(mlflow),
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
        print(f"guide: {json.dumps(metrics)}")
    remove_checkpoint(checkpoint.directory)


def load_guide_embeddings():
    """The guide's own prompt table (hidden, mask by prompt id), or None when it reads the teacher's."""
    path = GUIDE / "embeddings.safetensors"
    if not path.is_file():
        return None
    from .io import load_tensors

    t = load_tensors(path)
    return t["hidden_states"], t["attention_mask"]


def run_text_to_image(params: Params, variant: str) -> None:
    """One Table 3 student: the Diff-Instruct generator (paper/dvc.yaml `di`) and its fake score trained
    `text_to_image.steps` further with the variant's objective (jdm/training/phases.py,
    `text_to_image_players`); `di` continues plain score distillation, so every row costs the same."""
    from .errors import UserError
    from .models.fake_score import load_fake_score
    from .models.teacher import build_backbone, load_teacher
    from .objectives import VPSchedule
    from .pipeline import load_generator, save_generator
    from .rewards import load_reward
    from .training.phases import ControlData, TEXT_TO_IMAGE_VARIANTS, text_to_image_players, train_phase

    if variant not in TEXT_TO_IMAGE_VARIANTS:
        raise UserError(f"unknown text-to-image variant {variant!r}; available: {', '.join(TEXT_TO_IMAGE_VARIANTS)}")
    _setup(params)
    t = params.text_to_image
    overrides = {"di": {"condition_weight": 0.0}, "coupled-cfg": {"condition_weight": 0.0},
                 # guidance is an exact score of the guidance model: no t-range restriction (that is for f(x_t, t))
                 "decoupled-cfg": {"condition_weight": 1.0, "condition_t_max": None},
                 "hfl": {"condition_weight": t.reward_weight},
                 "hfl-on-x": {"condition_weight": t.reward_weight, "condition_on_x": True}}[variant]
    p = params.jdm.model_copy(update=overrides)
    prepared = jdata.PreparedData.load(PREPARED)
    train = prepared.split("train")
    hidden, mask = prepared.embeddings()
    data = ControlData(None, train.prompt_ids, hidden, mask)
    teacher_unet, noise_scheduler = load_teacher(TEACHER)
    schedule = VPSchedule.from_scheduler(noise_scheduler)
    backbone = build_backbone(params)
    source = VARIANTS["di"].root
    generator, _, meta = load_generator(source / "generator", primary=False)
    fake, _ = load_fake_score(source / "fake_score", p.lora_rank)
    guide_unet = load_teacher(GUIDE)[0] if variant == "decoupled-cfg" else None
    guide_embeddings = load_guide_embeddings() if variant == "decoupled-cfg" else None
    reward = load_reward(REWARDS / "train") if variant.startswith("hfl") else None

    def make_players(rng, data):
        return text_to_image_players(variant, generator, teacher_unet, fake, data, backbone, schedule, rng,
                                     guidance_scale=t.guidance_scale, guide_unet=guide_unet,
                                     guide_embeddings=guide_embeddings, reward=reward,
                                     prompt_dropout=p.prompt_dropout)

    stage_params = {**_section(params, "jdm", "text_to_image", "acceleration"), "jdm": p.model_dump(mode="json"),
                    "variant": variant}
    ckpt_dir = CHECKPOINTS / f"text-to-image-{variant}"
    with stage_run("text-to-image", params.profile, stage_params, condition="text", tags={"method": variant}) as mlflow:
        start = time.perf_counter()
        resumed_from = train_phase(generator, teacher_unet, fake, None, data, backbone, schedule, p, t.steps,
                                   train_unet=True, seed=params.seed, log=_logger(mlflow),
                                   checkpoint=_checkpoint(params, ckpt_dir, {**stage_params, "method": variant}),
                                   make_players=make_players, frozen=[m for m in (guide_unet, reward) if m is not None],
                                   acceleration=params.acceleration)
        metrics = {"train_seconds": time.perf_counter() - start, "steps": t.steps, "resumed_from_step": resumed_from}
        with atomic_dir(TEXT_TO_IMAGE / variant / "generator") as out:
            save_generator(generator, noise_scheduler, out, {k: v for k, v in meta.items() if k != "t_gen"})
        mlflow.log_artifacts(str(TEXT_TO_IMAGE / variant / "generator"), "generator")
        mlflow.log_metrics(metrics)
        write_json({"method": variant, **metrics}, TEXT_TO_IMAGE_METRICS / f"train-{variant}.json")
        print(f"text-to-image {variant}: {json.dumps(metrics)}")
    remove_checkpoint(ckpt_dir)


def run_evaluate_text_to_image(params: Params, methods: list[str]) -> None:
    """Table 3's rows: each method's samples for the same held-out prompts (`evaluation.num_samples`, the
    classes in turn), scored by the held-out reward (never trained against: the HPS stand-in), the
    training reward, prompt accuracy (the CLIP-score stand-in), FID and KID against the test split (with
    prompt accuracy, with 95% bootstrap intervals), NFE and latency; one MLflow run per row (stage `evaluate`, condition `text`), then reports/text-to-image."""
    from PIL import Image

    from .annotators.classifier import load_classifier
    from .errors import UserError
    from .evaluation import generate, latency_ms, one_step_sampler, score_samples
    from .metrics import prompt_hits
    from .models.teacher import build_backbone
    from .pipeline import load_generator
    from .report import write_text_to_image_report
    from .rewards import load_reward

    unknown = [m for m in methods if m not in TEXT_ROWS]
    if unknown:
        raise UserError(f"unknown text-to-image row(s) {', '.join(map(repr, unknown))}; available: {', '.join(TEXT_ROWS)}")
    _setup(params)
    e = params.evaluation
    prepared = jdata.PreparedData.load(PREPARED)
    hidden_table, mask_table = prepared.embeddings()
    g = torch.Generator().manual_seed(params.seed)
    classes = torch.arange(e.num_samples) % 10
    pid = jdata.assign_prompts(classes, len(params.data.templates), g)
    hidden, mask, null = hidden_table[pid], mask_table[pid], (hidden_table[:1], mask_table[:1])
    backbone = build_backbone(params)
    classifier = load_classifier(ANNOTATORS / "classifier")
    rewards = {f"reward_{which}": load_reward(REWARDS / which) for which in ("heldout", "train")}
    reference = prepared.split("test").pixels(slice(0, e.fid_reference))
    spaces = _spaces_of(params, classifier, reference)
    size = params.data.image_size // backbone.factor
    with torch.no_grad():  # the scale of each reward: real test images, the same for every row
        real = {f"{name}_real": reward(reference).mean().item() for name, reward in rewards.items()}
    for method in methods:
        if method == "teacher":
            sampler = _teacher_sampler(params, backbone, null)
        else:
            generator = load_generator(TEXT_TO_IMAGE / method / "generator", primary=False)[0]
            sampler = one_step_sampler(generator, None, backbone, size)
        with stage_run("evaluate", params.profile, _section(params, "evaluation"), condition="text",
                       tags={"method": method}) as mlflow:
            start = time.perf_counter()
            samples = generate(sampler, hidden, mask, None, batch_size=e.batch_size, seed=params.seed)
            metrics = {"nfe": sampler.nfe, "sample_seconds": time.perf_counter() - start,
                       "latency_ms": latency_ms(sampler, hidden, mask, None, e.latency_repeats),
                       **score_samples(samples, spaces, {"prompt_accuracy": prompt_hits(classifier, samples, classes).float()},
                                       resamples=e.bootstrap_resamples, seed=params.seed)}
            with torch.no_grad():
                metrics.update({name: reward(samples).mean().item() for name, reward in rewards.items()})
            metrics.update(real)
            mlflow.log_metrics(metrics)
            order = torch.argsort(classes[:4 * SAMPLES_SHOWN], stable=True)
            grid = image_grid(samples[:4 * SAMPLES_SHOWN][order], nrow=SAMPLES_SHOWN)
            mlflow.log_image(grid, f"{method}_text_samples.png")
            SAMPLES.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(SAMPLES / f"{method}-text.png")
            write_json({"method": method, "condition": "text", **metrics}, TEXT_TO_IMAGE_METRICS / f"{method}.json")
            print(f"evaluate {method} text: {json.dumps(metrics)}", flush=True)
    # the table holds every row scored so far, so evaluating one variant (the Prefect flow) refreshes it
    rows = [json.loads(f.read_text()) for f in (TEXT_TO_IMAGE_METRICS / f"{m}.json" for m in TEXT_ROWS) if f.is_file()]
    with stage_run("report", params.profile, _section(params, "evaluation"), tags={"table": "text-to-image"}) as mlflow:
        with atomic_dir(TEXT_TO_IMAGE_REPORT) as out:
            write_text_to_image_report(rows, SAMPLES, out, params.profile)
        mlflow.log_artifacts(str(TEXT_TO_IMAGE_REPORT), "report")
        print(f"report: {TEXT_TO_IMAGE_REPORT / 'index.html'} ({len(rows)} rows)")

