"""Prefect flows: orchestration only. Tasks run DVC (`dvc repro`) or the stage CLIs in the workspace
and talk to MLflow; nothing trains in the flow's process.

Deployments (prefect.yaml):
    jdm/add-control     a ControlNet for one condition on the frozen generator, registered in MLflow
    jdm/text-to-image   one one-step text-to-image variant of the paper's Table 3 (HFL, decoupled CFG, ...)
    jdm/reproduce       `dvc repro` of the whole pipeline (`-p jobs=2`: two stages at a time, as `make run`)
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from jdm_automations import LOST_WORKER_RETRIES  # flows/ is on the path, as for this module
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

# one DVC command at a time per workspace: DVC itself refuses a second concurrent repro
# ("unable to acquire lock"), so concurrent flow runs queue here instead of failing
LOCK_FILE = Path(".dvc/tmp/jdm-flows.lock")
# one file per flow run in progress on the workspace: its host and process, so the next flow run can
# tell a run whose worker was lost (still `Running` in Prefect, its process gone) and mark it crashed
RUNS_DIR = Path(".dvc/tmp/flow-runs")
# the driver that runs DVC stages side by side, from the checkout these flows run from
REPRO = Path(__file__).resolve().parents[1] / "infra" / "repro.py"


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


def _run(cmd: list[str], ws: Path) -> None:
    """Run a command in the workspace, its output streamed line by line into the flow run's log."""
    from jdm.env import tool_env
    from jdm.tracking import FLOW_RUN_ENV

    logger = get_run_logger()
    logger.info("$ %s   (in %s)", " ".join(cmd), ws)
    env = tool_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"  # the stages print as they go, not when a pipe's buffer fills
    if flow_run.id:
        env[FLOW_RUN_ENV] = str(flow_run.id)
    tail = collections.deque(maxlen=60)  # what the failure message quotes
    with _locked(ws):
        proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # text mode: a progress bar's carriage return ends a line too
            if line.strip():
                logger.info(line.rstrip())
                tail.append(line.rstrip())
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {code}:\n" + "\n".join(tail))


@contextlib.contextmanager
def _recorded(ws: Path):
    """This flow run's process recorded in the workspace while it runs; first, runs recorded there whose
    process is gone (a killed worker) are marked crashed, and their MLflow runs failed by the next stage.
    A run queued again after a lost worker (flows/jdm_automations.py) is refused past LOST_WORKER_RETRIES."""
    import psutil

    if flow_run.run_count > 1 + LOST_WORKER_RETRIES:
        raise RuntimeError(f"flow run {flow_run.name} crashed {flow_run.run_count - 1} times; not run again "
                           f"(at most {LOST_WORKER_RETRIES} retries after a lost worker)")
    runs = ws / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    _crash_abandoned(runs)
    me = psutil.Process()
    record = runs / f"{flow_run.id}.json"
    record.write_text(json.dumps({"id": str(flow_run.id), "host": socket.gethostname(), "pid": me.pid,
                                  "started": me.create_time()}))
    try:
        yield
    finally:
        record.unlink(missing_ok=True)


def _crash_abandoned(runs: Path) -> None:
    import psutil
    from prefect import get_client
    from prefect.states import Crashed

    logger = get_run_logger()
    for path in runs.glob("*.json"):
        rec = json.loads(path.read_text())
        if rec["host"] != socket.gethostname() or rec["id"] == str(flow_run.id):
            continue  # another machine's process, not ours to judge; or this run's own, lost before a retry
        try:
            alive = psutil.Process(rec["pid"]).create_time() == rec["started"]
        except psutil.NoSuchProcess:
            alive = False
        if alive:
            continue
        with get_client(sync_client=True) as client:
            lost = client.read_flow_run(rec["id"])
            # running (or starting) with its process gone; a run queued again is not lost
            if lost.state is not None and (lost.state.is_running() or lost.state.is_pending()):
                message = (f"its process {rec['pid']} on {rec['host']} ended without reporting (a lost worker); "
                           f"found by flow run {flow_run.name}")
                client.set_flow_run_state(lost.id, Crashed(message=message), force=True)
                logger.warning("flow run %s (%s) was left %s: marked crashed, %s", lost.name, lost.id,
                               lost.state.name, message)
        path.unlink(missing_ok=True)


def _publish_runs(ws: Path) -> None:
    """A link artifact to each MLflow run this flow run's stages made (their `prefect_flow_run_id` tag)."""
    from mlflow import MlflowClient
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from jdm.tracking import EXPERIMENT, tracking_uri

    uri = tracking_uri(ws)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.prefect_flow_run_id = '{flow_run.id}'")
    if not runs:
        return
    if uri.startswith(("http://", "https://")):
        for r in runs:
            create_link_artifact(f"{uri.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{r.info.run_id}",
                                 link_text=f"MLflow run {r.info.run_name}", description=f"stage {r.data.tags.get('stage')}")
    else:  # an embedded store has no address to link to: the runs as a list, opened with `make ui`
        create_markdown_artifact("\n".join([f"MLflow runs of this flow run (`make ui`, store `{uri}`):", ""] +
                                            [f"- `{r.info.run_name}`: run `{r.info.run_id}`" for r in runs]),
                                 description="MLflow runs")


def _publish_table(ws: Path, table: str, key: str) -> None:
    """The report's comparison table as a Markdown artifact (the Prefect UI's Artifacts tab)."""
    from prefect.artifacts import create_markdown_artifact

    path = ws / table
    if path.is_file():
        create_markdown_artifact(path.read_text(), key=key, description=f"{table} after this flow run")


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
def dvc_repro(ws: Path, targets: list[str], jobs: int = 1) -> None:
    """`dvc repro` of the targets; with a default DVC remote (workers that share state through it, as
    pods on a GPU pool do) missing outputs and the run cache are pulled first, so a stage another worker
    ran is restored instead of retrained, and what this one ran is pushed after, with its run cache.
    `jobs` above 1: independent stages side by side (infra/repro.py, what `make run JOBS=N` runs)."""
    shared = _has_remote(ws)
    pull = ["--pull"] if shared else []
    if jobs > 1:
        _run([sys.executable, str(REPRO), "--jobs", str(jobs), *pull, *targets], ws)
    else:
        _run(["dvc", "repro", *pull, *targets], ws)
    if shared:
        _run(["dvc", "push", "--run-cache", "--with-deps", *targets], ws)
        _push_uncached_outputs(ws, targets)


def _push_uncached_outputs(ws: Path, targets: list[str]) -> None:
    """The `cache: false` outputs (metrics and curves, which git keeps) of the targets and their upstream.
    A run-cache entry names them and DVC's run cache holds them in the local cache, but `dvc push` leaves
    them behind; without them another workspace cannot restore the stage from the run cache and trains
    it again (measured on smoke: teacher, classifier and warm-up retrained until they were pushed)."""
    from dvc.repo import Repo

    # DVC resolves a target against the working directory, which a worker's flow process does not share
    with _locked(ws), contextlib.chdir(ws), Repo(str(ws)) as repo:
        stages = ([s for t in targets for s in repo.stage.collect(t, with_deps=True)] if targets
                  else list(repo.index.stages))
        objs = {o.hash_info for s in stages for o in s.outs if not o.use_cache and o.hash_info and o.hash_info.value}
        try:
            result = repo.cloud.push(objs)
        except Exception as err:  # what trained is pushed already; the next worker would retrain, so say so
            get_run_logger().warning("could not push the uncached outputs (%s): another workspace will retrain "
                                     "their stages instead of restoring them", err)
            return
    get_run_logger().info("pushed %d uncached outputs (metrics, curves) for the run cache", len(result.transferred))


def _has_remote(ws: Path) -> bool:
    from jdm.env import tool_env

    out = subprocess.run(["dvc", "remote", "default"], cwd=ws, capture_output=True, text=True, env=tool_env())
    return out.returncode == 0 and bool(out.stdout.strip())


@task
def run_stage(ws: Path, args: list[str]) -> None:
    _run(["jdm", *args], ws)


@task(retries=3, retry_delay_seconds=5)  # the tracking server may be briefly unreachable
def register(ws: Path, condition: str) -> str:
    from jdm.serving import register_controlnet

    name, version = register_controlnet(condition, ws)
    get_run_logger().info("registered %s version %s (alias 'newest')", name, version)
    return f"{name}/{version}"


@flow(name="jdm", flow_run_name="add-control-{condition}", log_prints=True)
def add_control(condition: str, profile: str | None = None, steps: int | None = None,
                workspace: str | None = None) -> str:
    """Train and register a ControlNet for `condition` (a built-in name or 'package.module:Class') on the
    shared generator, building the upstream stages (data, teacher, warm-up, ...) only if they are missing.

    `steps` overrides `extend.steps` for this run: a DVC experiment (`dvc exp run -S extend.steps=N`, listed by
    `dvc exp show` with its params and metrics) trains it in the workspace, whose params.yaml is then put
    back, so `dvc status` shows that ControlNet as off the team's params until `dvc exp apply` or the next
    `dvc repro`. (A plugin has no stage: its override is a derived params file for the stage CLI.)
    `profile` switches the workspace's params.yaml first (`jdm profile`)."""
    is_plugin = check_condition(condition)
    ws = _workspace(workspace)
    with _recorded(ws):
        primary = check_params(ws, profile)
        if condition == primary:
            dvc_repro(ws, ["warmup"])
        elif not is_plugin and steps is None:
            dvc_repro(ws, [f"extend@{condition}"])
        elif not is_plugin:
            dvc_repro(ws, ["warmup", f"conditions@{condition}"])  # the shared upstream, pulled and pushed as usual
            dvc_experiment(ws, f"extend@{condition}", {"extend.steps": steps})
        else:
            # a plugin has no stage in dvc.yaml (nothing in the repository changes to add one): its
            # upstream comes through DVC, its own maps and ControlNet through the same stage CLIs
            dvc_repro(ws, ["warmup"])
            run_stage(ws, ["conditions", condition])
            extra = [] if steps is None else ["--params", str(_override_params(ws, condition, steps))]
            run_stage(ws, [*extra, "extend", condition])
        registered = register(ws, condition)
        _publish_runs(ws)
    return registered


@task
def dvc_experiment(ws: Path, target: str, settings: dict) -> None:
    """`dvc exp run -S key=value ... target` in the workspace: DVC records the experiment (params, metrics,
    outputs' hashes) against the workspace's commit. The experiment rewrites params.yaml; it is put back."""
    params = ws / "params.yaml"
    before = params.read_bytes()
    try:
        _run(["dvc", "exp", "run", *(a for k, v in settings.items() for a in ("-S", f"{k}={v}")), target], ws)
    finally:
        params.write_bytes(before)


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


@flow(name="jdm", flow_run_name="text-to-image-{variant}", log_prints=True)  # the deployment is `jdm/text-to-image`
def text_to_image(variant: str = "decoupled-cfg", profile: str | None = None, workspace: str | None = None) -> dict:
    """Train one Table 3 variant (`dvc repro paper/dvc.yaml:text-to-image@<variant>`, building its upstream
    only if missing: rewards, guide, DI student), score its row beside the others already scored, and
    refresh reports/text-to-image. Returns the row (also in MLflow: stage `evaluate`, condition `text`)."""

    check_variant(variant)
    ws = _workspace(workspace)
    with _recorded(ws):
        check_params(ws, profile)
        dvc_repro(ws, [f"paper/dvc.yaml:text-to-image@{variant}"])
        run_stage(ws, ["evaluate-text-to-image", "--methods", variant])
        _publish_table(ws, "reports/text-to-image/table.md", "jdm-text-to-image-table")
        _publish_runs(ws)
    return json.loads((ws / "metrics" / "text-to-image" / f"{variant}.json").read_text())


def _reproduce_name() -> str:
    """`reproduce-<profile>`: the profile asked for, or the workspace's own."""
    import yaml

    params = flow_run.parameters
    profile = params.get("profile")
    if not profile:
        with contextlib.suppress(OSError, yaml.YAMLError, TypeError, KeyError):  # OSError: no workspace
            profile = yaml.safe_load((_workspace(params.get("workspace")) / "params.yaml").read_text())["profile"]
    return f"reproduce-{profile or 'workspace'}"


@flow(name="jdm", flow_run_name=_reproduce_name, log_prints=True)  # same flow name: the deployment is `jdm/reproduce`
def reproduce(profile: str | None = None, workspace: str | None = None, jobs: int = 1) -> None:
    """`dvc repro` of the whole pipeline (what changed since the last run); the table as an artifact.
    `jobs`: stages at once (`make run`'s JOBS; 1, the default, is plain `dvc repro` with every core; the
    thread count per stage, and so the trained bytes, follow it: docs/operations.md)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r}: the number of DVC stages at once must be a whole number, 1 or more")
    ws = _workspace(workspace)
    with _recorded(ws):
        check_params(ws, profile)
        dvc_repro(ws, [], jobs)
        _publish_table(ws, "reports/main/table.md", "jdm-main-table")
        _publish_runs(ws)
