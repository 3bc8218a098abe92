"""Prefect flows: orchestration only. Tasks run DVC (`dvc repro`) or the stage CLIs in the workspace
and talk to MLflow; nothing trains in the flow's process.

Deployments (prefect.yaml):
    jdm/add-control     a ControlNet for one condition on the frozen generator, registered in MLflow
    jdm/text-to-image   one one-step text-to-image variant of the paper's Table 3 (HFL, decoupled CFG, ...)
    jdm/reproduce       `dvc repro` of the whole pipeline
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task

# one DVC command at a time per workspace: DVC itself refuses a second concurrent repro
# ("unable to acquire lock"), so concurrent flow runs queue here instead of failing
LOCK_FILE = Path(".dvc/tmp/jdm-flows.lock")


def _workspace(workspace: str | None) -> Path:
    ws = Path(workspace or os.environ.get("JDM_WORKSPACE") or os.getcwd()).resolve()
    if not (ws / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{ws} is not a JDM workspace (no dvc.yaml): deploy from the repository root "
                                f"or set JDM_WORKSPACE")
    return ws


@contextlib.contextmanager
def _locked(ws: Path):
    path = ws / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list[str], ws: Path) -> str:
    from jdm.env import tool_env

    logger = get_run_logger()
    logger.info("$ %s   (in %s)", " ".join(cmd), ws)
    env = tool_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    with _locked(ws):
        out = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    tail = (out.stdout[-4000:] + out.stderr[-4000:]).strip()
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {out.returncode}:\n{tail}")
    logger.info(tail[-2000:])
    return out.stdout


@task
def check_condition(condition: str) -> bool:
    """Fail before any training: an unknown name lists the available conditions. True for plugins."""
    from jdm.conditions import BUILTIN, resolve_condition_class

    resolve_condition_class(condition)
    return condition not in BUILTIN


@task
def check_params(ws: Path, profile: str | None) -> str:
    from jdm.config import load_params

    if profile:
        _run(["jdm", "profile", profile], ws)  # refuses to overwrite a params.yaml holding edits
    return load_params(ws / "params.yaml").warmup.condition


@task
def dvc_repro(ws: Path, targets: list[str]) -> None:
    _run(["dvc", "repro", *targets], ws)


@task
def run_stage(ws: Path, args: list[str]) -> None:
    _run(["jdm", *args], ws)


@task(retries=3, retry_delay_seconds=5)  # the tracking server may be briefly unreachable
def register(ws: Path, condition: str) -> str:
    from jdm.tracking import register_controlnet

    name, version = register_controlnet(condition, ws)
    get_run_logger().info("registered %s version %s (alias 'newest')", name, version)
    return f"{name}/{version}"


@flow(name="jdm", log_prints=True)
def add_control(condition: str, profile: str | None = None, steps: int | None = None,
                workspace: str | None = None) -> str:
    """Train and register a ControlNet for `condition` (a built-in name or 'package.module:Class') on the
    shared generator, building the upstream stages (data, teacher, warm-up, ...) only if they are missing.

    `steps` overrides `extend.steps` for this run: it runs the stage CLI with a derived params file, so
    that ControlNet is outside DVC's record until the next `dvc repro`. `profile` switches the
    workspace's params.yaml first (`jdm profile`)."""
    is_plugin = check_condition(condition)
    ws = _workspace(workspace)
    primary = check_params(ws, profile)
    if condition == primary:
        dvc_repro(ws, ["warmup"])
    elif not is_plugin and steps is None:
        dvc_repro(ws, [f"extend@{condition}"])
    else:
        # a plugin has no stage in dvc.yaml (nothing in the repository changes to add one): its
        # upstream comes through DVC, its own maps and ControlNet through the same stage CLIs
        dvc_repro(ws, ["warmup"] + ([] if is_plugin else [f"conditions@{condition}"]))
        if is_plugin:
            run_stage(ws, ["conditions", condition])
        extra = []
        if steps is not None:
            extra = ["--params", str(_override_params(ws, condition, steps))]
        run_stage(ws, [*extra, "extend", condition])
    return register(ws, condition)


def _override_params(ws: Path, condition: str, steps: int) -> Path:
    import yaml

    from jdm.conditions import condition_slug

    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["extend"]["steps"] = steps
    path = ws / ".dvc" / "tmp" / f"params-{condition_slug(condition)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@task
def check_variant(variant: str) -> None:
    """Fail before any training: an unknown variant lists the available ones."""
    from jdm.variants import TEXT_TO_IMAGE_VARIANTS

    if variant not in TEXT_TO_IMAGE_VARIANTS:
        raise ValueError(f"unknown text-to-image variant {variant!r}; available: {', '.join(TEXT_TO_IMAGE_VARIANTS)}")


@flow(name="jdm", log_prints=True)  # same flow name: the deployment is `jdm/text-to-image`
def text_to_image(variant: str = "decoupled-cfg", profile: str | None = None, workspace: str | None = None) -> dict:
    """Train one Table 3 variant (`dvc repro paper/dvc.yaml:text-to-image@<variant>`, building its upstream
    only if missing: rewards, guide, DI student), score its row beside the others already scored, and
    refresh reports/text-to-image. Returns the row (also in MLflow: stage `evaluate`, condition `text`)."""
    import json

    check_variant(variant)
    ws = _workspace(workspace)
    check_params(ws, profile)
    dvc_repro(ws, [f"paper/dvc.yaml:text-to-image@{variant}"])
    run_stage(ws, ["evaluate-text-to-image", "--methods", variant])
    return json.loads((ws / "metrics" / "text-to-image" / f"{variant}.json").read_text())


@flow(name="jdm", log_prints=True)  # same flow name: the deployment is `jdm/reproduce`
def reproduce(profile: str | None = None, workspace: str | None = None) -> None:
    """`dvc repro` of the whole pipeline (what changed since the last run)."""
    ws = _workspace(workspace)
    check_params(ws, profile)
    dvc_repro(ws, [])
