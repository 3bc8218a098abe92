"""What every stage shares: the workspace's paths, seeding, the params section a stage records, its
MLflow logger and checkpoint settings, and the condition maps the training and evaluation stages read."""

from __future__ import annotations

import json
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


def recording(log: Callable[[int, dict], None], curve: list, keep: Path | None = None) -> Callable[[int, dict], None]:
    """`log` that also keeps each validation record (the `eval_*` values) in `curve`, for a DVC plot.

    `keep` (a checkpoint spec's `records`): a JSON-lines file each record is appended to and `curve`
    starts from, so a stage resumed from a checkpoint continues its curve instead of starting it at the
    resume. A record at step s replaces the rows from s on: after a resume those steps are trained again."""
    def add(row: dict) -> None:
        curve[:] = [r for r in curve if r["step"] < row["step"]] + [row]

    if keep is not None and keep.is_file():
        text = keep.read_text()
        if not text.endswith("\n"):  # a kill mid-append leaves a torn last line: drop it before appending
            text = text[:text.rfind("\n") + 1]
            keep.write_text(text)
        for line in text.splitlines():
            add(json.loads(line))

    def record(step: int, values: dict) -> None:
        log(step, values)
        if any(k.startswith("eval_") for k in values):
            row = {"step": step, **values}
            add(row)
            if keep is not None:
                keep.parent.mkdir(parents=True, exist_ok=True)
                with keep.open("a") as f:
                    f.write(json.dumps(row) + "\n")
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

