"""The report stages: the comparison table with its sample grids, and the headline rows across
training seeds (jdm/report.py writes both)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import data as jdata
from ..config import Params
from ..conditions import condition_slug
from ..io import atomic_dir, write_json
from ..tracking import image_grid, stage_run
from ..variants import has_row
from .common import METRICS, PREPARED, REFERENCE, SAMPLES, SAMPLES_SHOWN, section, setup
from .evaluation import held_out_prompts

log = logging.getLogger(__name__)


def run_report(params: Params, methods: list[str], conditions: list[str], out_dir: Path) -> None:
    """The table (Markdown and HTML, the paper's numbers beside ours) and sample grids per condition."""
    from ..io import load_tensors
    from ..report import write_report

    setup(params)
    rows = []
    for method in methods:
        for name in conditions:
            if not has_row(method, name, params.warmup.condition):
                continue
            path = METRICS / "eval" / f"{method}-{condition_slug(name)}.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run `jdm evaluate {name} --methods {method}` "
                                        f"(DVC: the evaluate stage of condition {name!r})")
            rows.append(json.loads(path.read_text()))
    prepared = jdata.PreparedData.load(PREPARED)
    teacher = load_tensors(REFERENCE / "samples.safetensors")["samples"][:SAMPLES_SHOWN].float() / 255
    pictures = {"teacher": image_grid(teacher, nrow=SAMPLES_SHOWN)}
    for name in conditions:
        maps = held_out_prompts(params, prepared, name)[3][:SAMPLES_SHOWN]
        pictures[f"maps-{condition_slug(name)}"] = image_grid(maps, nrow=SAMPLES_SHOWN)
    with stage_run("report", params.profile, section(params, "evaluation")) as mlflow:
        with atomic_dir(out_dir) as out:
            write_report(rows, methods, [condition_slug(c) for c in conditions], pictures, SAMPLES, out, params.profile)
        mlflow.log_artifacts(str(out_dir), "report")
        log.info(f"report: {out_dir / 'index.html'} ({len(rows)} rows)")


def run_seeds_report(params: Params, offsets: list[int], out_dir: Path) -> None:
    """The headline rows (JDM, ControlNet-50) of `make run`'s seed and of each extra seed (seeds/<k>/):
    metrics/seeds.json and reports/seeds/table.md, mean and std per cell and each claim seed by seed."""
    from ..report import seeds_summary, write_seeds_report

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
    with stage_run("seeds-report", params.profile, section(params, "evaluation")) as mlflow:
        with atomic_dir(out_dir) as out:
            write_seeds_report(summary, methods, conditions, out, params.profile)
        write_json(summary, METRICS / "seeds.json")
        mlflow.log_metrics({f"{name}_holds_on": claim["holds_on"] for name, claim in summary["claims"].items()})
        mlflow.log_artifacts(str(out_dir), "report")
        log.info((out_dir / "table.md").read_text())

