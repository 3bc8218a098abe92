"""The ControlNets trained by denoising rather than by JDM: ControlNet-50 on the teacher, and Eq. 11's
on the frozen Diff-Instruct generator (jdm/training/controlnet.py)."""

from __future__ import annotations

import json
import logging
import time

from .. import data as jdata
from ..config import Params
from ..conditions import condition_slug
from ..io import atomic_dir, write_json
from ..tracking import stage_run
from ..training.checkpoint import remove_checkpoint
from ..variants import CONTROLNET_BASELINES, VARIANTS
from .common import CHECKPOINTS, METRICS, MODELS, PREPARED, TEACHER, checkpoint_spec, control_data, logger, section, setup

log = logging.getLogger(__name__)


def run_controlnet_baseline(params: Params, name: str, method: str) -> None:
    """`controlnet-50`: a ControlNet trained by denoising on the teacher (params `controlnet`);
    `denoising`: one trained by Eq. 11 through the frozen Diff-Instruct generator (params `baselines`)."""
    from ..conditions import load_condition
    from ..models.generator import controlnet_from_unet
    from ..models.teacher import build_backbone, load_teacher
    from ..pipeline import load_generator, save_controlnet
    from ..training.controlnet import generator_regression_loss, teacher_loss, train_controlnet
    from ..training.parallel import process_state

    setup(params)
    condition = load_condition(name, params, MODELS)
    prepared = jdata.PreparedData.load(PREPARED)
    data, _ = control_data(prepared, name, with_images=True)
    condition.check_map(data.maps[:1], params.data.image_size)
    backbone = build_backbone(params)
    if method == "controlnet-50":
        unet, noise_scheduler = load_teacher(TEACHER)
        loss, frozen = teacher_loss(unet, noise_scheduler, params.teacher.snr_gamma), unet
        c = params.controlnet
        settings = {"steps": c.steps, "batch_size": c.batch_size, "lr": c.lr, "prompt_dropout": c.prompt_dropout}
        params_section = "controlnet"
    else:
        generator = load_generator(VARIANTS["di"].root / "generator", primary=False)[0]
        unet, loss, frozen = generator.unet, generator_regression_loss(generator), generator
        b = params.baselines
        settings = {"steps": b.denoising_steps, "batch_size": b.denoising_batch_size, "lr": b.denoising_lr,
                    "prompt_dropout": 0.0}
        params_section = "baselines"
    controlnet = controlnet_from_unet(unet, condition.channels, backbone.factor)
    out_dir = CONTROLNET_BASELINES[method] / f"controlnet-{condition_slug(name)}"
    checkpoint = checkpoint_spec(params, CHECKPOINTS / f"{method}-{condition_slug(name)}",
                                 {**section(params, params_section, "acceleration"), "condition": name, "method": method})

    def train(log_step):
        return train_controlnet(controlnet, loss, data, backbone, seed=params.seed, log=log_step, checkpoint=checkpoint,
                                frozen=[frozen], acceleration=params.acceleration, **settings)

    if not process_state().is_main_process:  # under `accelerate launch`: train beside the main process, which records
        train(None)
        return
    with stage_run(method, params.profile, section(params, params_section, "acceleration"), condition=name,
                   tags={"method": method}) as mlflow:
        start = time.perf_counter()
        controlnet = train(logger(mlflow))
        metrics = {"train_seconds": time.perf_counter() - start, "steps": settings["steps"]}
        with atomic_dir(out_dir) as out:
            save_controlnet(controlnet, name, out)
        mlflow.log_artifacts(str(out_dir), "controlnet")
        mlflow.log_metrics(metrics)
        write_json({"condition": name, "method": method, **metrics},
                   METRICS / "baselines" / f"{method}-{condition_slug(name)}.json")
        log.info(f"{method} {name}: {json.dumps(metrics)}")
    remove_checkpoint(checkpoint.directory)

