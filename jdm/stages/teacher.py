"""The teacher stage: the multi-step text-to-image diffusion model every student distils."""

from __future__ import annotations

import time


from .. import data as jdata
from ..config import Params
from ..io import atomic_dir, write_json
from ..tracking import stage_run
from ..training.checkpoint import remove_checkpoint
from .common import CHECKPOINTS, METRICS, PREPARED, TEACHER, checkpoint_spec, logger, section, setup


def run_teacher(params: Params) -> None:
    """Single process, or several under `accelerate launch`: all train, the main process records and saves."""
    from ..models.teacher import build_backbone, save_teacher
    from ..training.parallel import process_state
    from ..training.teacher import train_teacher

    setup(params)
    p = params.teacher
    state = process_state()
    checkpoint = checkpoint_spec(params, CHECKPOINTS / "teacher", section(params, "teacher", "acceleration"))
    if not state.is_main_process:
        if not p.pretrained:
            prepared = jdata.PreparedData.load(PREPARED)
            train_teacher(p, prepared.split("train"), prepared.embeddings(), build_backbone(params), seed=params.seed,
                          checkpoint=checkpoint, acceleration=params.acceleration)
        return
    with stage_run("teacher", params.profile, section(params, "teacher", "acceleration")) as mlflow:
        with atomic_dir(TEACHER) as out:
            if p.pretrained:
                write_json({"pretrained": p.pretrained}, out / "pretrained.json")
                metrics = {}
            else:
                prepared = jdata.PreparedData.load(PREPARED)
                start = time.perf_counter()
                unet, noise_scheduler = train_teacher(p, prepared.split("train"), prepared.embeddings(),
                                                      build_backbone(params), seed=params.seed, log=logger(mlflow),
                                                      checkpoint=checkpoint, acceleration=params.acceleration)
                metrics = {"train_seconds": time.perf_counter() - start,
                           "num_parameters": sum(q.numel() for q in unet.parameters()),
                           "num_processes": state.num_processes}
                save_teacher(unet, noise_scheduler, out)
        mlflow.log_metrics(metrics)
        write_json(metrics, METRICS / "teacher-train.json")
    remove_checkpoint(checkpoint.directory)  # the outputs are saved: the checkpoint has done its job

