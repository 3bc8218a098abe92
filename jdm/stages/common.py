"""What every stage shares: the workspace's paths, seeding, the params section a stage records, its
MLflow logger and checkpoint settings, and the condition maps the training and evaluation stages read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..config import Params

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from types import ModuleType

    from ..data import PreparedData
    from ..training.checkpoint import CheckpointSpec
    from ..training.phases import ControlData

PREPARED = Path("data/prepared")
CONDITIONS = Path("data/conditions")
MODELS = Path("models")
ANNOTATORS = MODELS / "annotators"
TEACHER = MODELS / "teacher"
REFERENCE = Path("data/reference")
CHECKPOINTS = Path("checkpoints")
METRICS = Path("metrics")
SAMPLES = Path("reports/samples")
SAMPLES_SHOWN = 8


def setup(params: Params) -> None:
    # 0: torch's own default (OMP_NUM_THREADS where set, else the machine's cores), so a launcher or a
    # test runner that sets OMP_NUM_THREADS decides without editing params.yaml
    torch.set_num_threads(params.threads or torch.get_num_threads())
    torch.manual_seed(params.seed)


def section(params: Params, *names: str) -> dict:
    dumped = params.model_dump(mode="json")
    return {"seed": params.seed, **{n: dumped[n] for n in names}}


def checkpoint_spec(params: Params, directory: Path, settings: dict) -> CheckpointSpec:
    from ..training.checkpoint import CheckpointSpec
    return CheckpointSpec(directory, settings, params.checkpoint.every, params.checkpoint.keep)


def logger(mlflow: ModuleType) -> Callable[[int, dict], None]:
    def log_step(step: int, values: dict) -> None:
        mlflow.log_metrics(values, step=step)
        log.info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    return log_step


def recording(log: Callable[[int, dict], None], curve: list) -> Callable[[int, dict], None]:
    """`log` that also keeps each validation record (the `eval_*` values) in `curve`, for a DVC plot."""
    def record(step: int, values: dict) -> None:
        log(step, values)
        if any(k.startswith("eval_") for k in values):
            curve.append({"step": step, **values})
    return record


def curve_path(metrics_file: Path) -> Path:
    """metrics/<x>.json -> metrics/curves/<x>.json (baselines: metrics/curves/baselines/<x>.json)."""
    return METRICS / "curves" / metrics_file.relative_to(METRICS)


def load_condition_maps(name: str) -> dict[str, torch.Tensor]:
    """Condition maps as float [N,C,H,W] in [0,1] for the 'train' prefix and the 'eval' split."""
    from ..conditions import condition_slug
    from ..io import load_tensors

    path = CONDITIONS / condition_slug(name) / "maps.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no condition maps at {path}: run `jdm conditions {name}` (or `dvc repro conditions@{name}`)")
    return {k: v.float() / 255 for k, v in load_tensors(path).items()}


def control_data(prepared: PreparedData, name: str, with_images: bool = False) -> tuple[ControlData, ControlData]:
    """Training and held-out control maps, each with the prompt of the image it came from (read once);
    `with_images` adds the training images themselves (the denoising baselines train on them). The
    held-out maps always carry their images: the validation curves' FID is taken against them."""
    from ..training.phases import ControlData

    maps = load_condition_maps(name)
    hidden, mask = prepared.embeddings()
    train, held_out = prepared.split("train"), prepared.split("eval")
    n, n_eval = len(maps["train"]), len(maps["eval"])
    images = train.pixels(slice(0, n)) if with_images else None
    return (ControlData(maps["train"], train.prompt_ids[:n], hidden, mask, images),
            ControlData(maps["eval"], held_out.prompt_ids[:n_eval], hidden, mask, held_out.pixels(slice(0, n_eval))))

