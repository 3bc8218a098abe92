"""The foundation stages: data, annotators, judges and condition maps, everything the teacher and the
students are trained and scored on."""

from __future__ import annotations

import logging
import time

import torch

from .. import data as jdata
from ..config import Params
from ..errors import UserError
from ..io import atomic_dir, save_tensors, write_json
from ..progress import progress
from ..tracking import channel_tiles, image_grid, stage_run
from .common import ANNOTATORS, CONDITIONS, METRICS, MODELS, PREPARED, logger, section, setup

log = logging.getLogger(__name__)


def run_data(params: Params) -> None:
    """The source's images at the profile's size, prompts, prompt embeddings, a fixed held-out split."""
    from ..text import TextEncoder

    setup(params)
    p = params.data
    with stage_run("data", params.profile, section(params, "data", "text_encoder")) as mlflow:
        g = torch.Generator().manual_seed(params.seed)
        source = (jdata.fashion_mnist if p.source == "fashion-mnist" else jdata.image_folder)(p, g)
        hidden, mask = TextEncoder.from_params(params.text_encoder).encode(source.prompts)
        if not source.class_names:
            source = jdata.classes_from_captions(source, hidden, mask, p.caption_classes, params.seed)
            log.info(f"data: no {p.label_column!r} in {p.root}: {len(source.class_names)} classes from the captions")
        with atomic_dir(PREPARED) as out:
            for name, (images, labels, prompt_ids) in source.splits.items():
                save_tensors({"images": images, "labels": labels, "prompt_ids": prompt_ids}, out / f"{name}.safetensors")
            save_tensors({"hidden_states": hidden, "attention_mask": mask}, out / "embeddings.safetensors")
            write_json({"prompts": source.prompts, "prompt_classes": source.prompt_classes,
                        "class_names": source.class_names}, out / "prompts.json")
        prepared = jdata.PreparedData.load(PREPARED)
        sizes = {f"num_{n}": len(prepared.split(n)) for n in source.splits}
        mlflow.log_metrics({**sizes, "num_prompts": len(source.prompts)})
        mlflow.log_image(image_grid(prepared.split("eval").pixels(slice(0, 64))), "eval_images.png")
        log.info(f"data: {sizes}, {len(source.prompts)} prompts, embeddings {tuple(hidden.shape)}")


def run_annotator(params: Params, name: str) -> None:
    """hed: port the BSDS500 HED weights; depth: train the MiDaS stand-in; classifier: train it."""
    setup(params)
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
                from ..annotators.hed import save_hed
                save_hed(out)
            elif name == "depth":
                from ..annotators.depth import save_depth_net, train_depth_net
                model, metrics = train_depth_net(steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                                                 size=params.data.image_size, seed=params.seed, log=logger(mlflow))
                save_depth_net(model, out)
            else:
                from ..annotators.classifier import save_classifier, train_classifier
                prepared = jdata.PreparedData.load(PREPARED)
                if len(prepared.class_names) < 2:
                    raise UserError(f"the classifier needs two classes or more, and {params.data.root} has "
                                    f"{prepared.class_names}: prompt accuracy and the classifier's FID features come "
                                    f"from it; give the images {params.data.label_column!r} labels or distinct captions")
                train, held_out = prepared.split("train"), prepared.split("eval")
                model, metrics = train_classifier(train.images, train.labels, held_out.images, held_out.labels,
                                                  num_classes=len(prepared.class_names), steps=p.steps,
                                                  batch_size=p.batch_size, lr=p.lr, seed=params.seed, log=logger(mlflow))
                save_classifier(model, out)
        mlflow.log_metrics(metrics)
        write_json(metrics, METRICS / f"annotator-{name}.json")
        log.info(f"annotator {name}: {metrics}")


def run_judge(params: Params, name: str) -> None:
    """depth: train the second depth stand-in that scores consistency beside the conditions' own
    (judges.py). The hed judge has no weights and so no stage."""
    from ..annotators.depth import save_depth_net, train_depth_net
    from ..judges import judge_path

    if name != "depth":
        raise UserError(f"no judge to train for {name!r}; allowed: depth (the hed judge has no weights)")
    setup(params)
    p = params.judges.depth
    with stage_run(f"judge-{name}", params.profile, {"judges": {name: p.model_dump(mode="json")}}) as mlflow:
        with atomic_dir(judge_path(MODELS, name)) as out:
            model, metrics = train_depth_net(steps=p.steps, batch_size=p.batch_size, lr=p.lr, size=params.data.image_size,
                                             seed=p.seed, channels=tuple(p.channels), log=logger(mlflow))
            save_depth_net(model, out)
        mlflow.log_metrics(metrics)
        write_json(metrics, METRICS / f"judge-{name}.json")
        log.info(f"judge {name}: {metrics}")


def run_conditions(params: Params, name: str) -> None:
    """Exact condition maps for (a prefix of) the train split and the whole eval split."""
    from ..conditions import condition_slug, load_condition

    setup(params)
    cond = load_condition(name, params, MODELS)
    prepared = jdata.PreparedData.load(PREPARED)
    p = params.conditions
    with stage_run("conditions", params.profile, section(params, "conditions"), condition=name) as mlflow:
        start = time.perf_counter()
        maps = {}
        for split, limit in (("train", p.max_train), ("eval", None)):
            s = prepared.split(split)
            n = len(s) if limit is None else min(limit, len(s))
            chunks = [cond.extract(s.pixels(slice(i, min(n, i + p.batch_size))))
                      for i in progress(range(0, n, p.batch_size), f"{name} maps, {split} split")]
            maps[split] = (torch.cat(chunks).clamp(0, 1) * 255).round().to(torch.uint8)
        with atomic_dir(CONDITIONS / condition_slug(name)) as out:
            save_tensors(maps, out / "maps.safetensors", metadata={"condition": name, "channels": cond.channels})
        seconds = time.perf_counter() - start
        held_out = prepared.split("eval")
        # rows of 8 images, each followed by their maps' rows (one per channel where it is neither gray nor RGB)
        images, shown_maps = held_out.pixels(slice(0, 16)), maps["eval"][:16].float() / 255
        shown = [channel_tiles(x[i:i + 8]) for i in (0, 8) for x in (images, shown_maps)]
        mlflow.log_image(image_grid(torch.cat(shown), nrow=8), f"{name}_maps.png")
        stats = {"num_train_maps": len(maps["train"]), "num_eval_maps": len(maps["eval"]),
                 "mean_value": maps["eval"].float().mean().item() / 255, "seconds": seconds}
        mlflow.log_metrics(stats)
        log.info(f"conditions {name}: {stats}")

