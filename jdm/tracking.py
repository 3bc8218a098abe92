"""MLflow: one run per stage, in experiment `jdm`, tagged so runs line up in the compare view.

The embedded default is a SQLite store and an artifact folder at the repository's root;
MLFLOW_TRACKING_URI points elsewhere (a team's `mlflow server`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import subprocess
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from types import ModuleType

EXPERIMENT = "jdm"
FLOW_RUN_ENV = "JDM_PREFECT_FLOW_RUN_ID"  # set by the Prefect flows for the stages they start


def repository_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` (default: the working directory) that holds `.dvc/`: a
    stage run from a subfolder (seeds/<k>/ of seeds/dvc.yaml) records into the repository's one store,
    and so does a `dvc exp run --temp` experiment, which DVC runs in a copy under `.dvc/tmp/exps/`."""
    start = (start or Path.cwd()).resolve()
    root = next((d for d in (start, *start.parents) if (d / ".dvc").is_dir()), start)
    for outer in root.parents:  # DVC 3.67 runs one at .dvc/tmp/exps/standalone/tmpXXXX/
        if outer.name == ".dvc" and root.relative_to(outer).parts[:2] == ("tmp", "exps"):
            return outer.parent
    return root


def tracking_uri(workspace: Path | None = None) -> str:
    workspace = repository_root(workspace)
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace / 'mlflow.db'}"


def git_commit(workspace: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace or Path.cwd(), capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def check_reachable(uri: str) -> None:
    """Fail before any training when a remote tracking server does not answer, naming it."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).read()
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(f"MLflow tracking server {uri} is unreachable ({err}); "
                              "start it or unset MLFLOW_TRACKING_URI") from None


def _check_artifact_store(mlflow, params: dict) -> None:
    """Store the run's params as its first artifact, without MLflow's retries (about five minutes of
    them by default): an artifact store that cannot take it (the S3 endpoint behind a tracking server
    down, a missing bucket) fails the stage here, before any work and before any output is touched."""
    artifact_uri = mlflow.get_artifact_uri()
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        mlflow.log_dict(params, "params.json")
    except Exception as err:  # MlflowException through a server, botocore's errors when the client writes to S3
        s3 = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        where = f"S3 endpoint {s3}" if s3 else "the tracking server's artifact destination (its MLFLOW_S3_ENDPOINT_URL, for S3)"
        raise ConnectionError(f"MLflow artifact store {artifact_uri} is unreachable; check {where}. "
                              f"Cause: {err}") from None
    finally:
        if retries is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


@contextlib.contextmanager
def recording_to(uri: str) -> Iterator[None]:
    """`mlflow.set_tracking_uri(uri)` for the block. MLflow also exports it as MLFLOW_TRACKING_URI to this
    process's environment, for child processes: both are put back after, or every process this one starts
    later (a flow's next stage on another workspace, a test's subprocess) would record here."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets both


@contextlib.contextmanager
def _one_at_a_time(uri: str) -> Iterator[None]:
    """For a SQLite store, the block under an exclusive lock on `<db>.lock`: two stages started at once
    (infra/repro.py --jobs 2) would both create a new store's tables or the experiment, and MLflow's
    schema creation fails on the second ("table ... already exists"). A server serialises this itself."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# MLflow 3's UI opens an experiment without this tag as a GenAI one (an empty traces overview); this
# one is model training: runs, metrics, models
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


@contextlib.contextmanager
def stage_run(stage: str, profile: str, params: dict, condition: str | None = None, workspace: Path | None = None,
              tags: dict | None = None) -> Iterator[ModuleType]:
    """Start the stage's MLflow run with its tags (stage, profile, commit, condition, and e.g. `method`,
    so the compare view lines up methods and conditions) and params; yield the mlflow module."""
    import mlflow

    workspace = repository_root(workspace)
    uri = tracking_uri(workspace)
    check_reachable(uri)
    with recording_to(uri):
        with _one_at_a_time(uri):
            if mlflow.get_experiment_by_name(EXPERIMENT) is None:
                artifacts = None if uri.startswith(("http://", "https://")) else (workspace / "mlartifacts").as_uri()
                mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
            experiment = mlflow.set_experiment(EXPERIMENT)
            if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                mlflow.set_experiment_tag(*EXPERIMENT_KIND)
        fail_abandoned_runs(mlflow.MlflowClient(uri), experiment.experiment_id)
        run_tags = {"stage": stage, "profile": profile, "git_commit": git_commit(workspace), **_process_tags(),
                    **(tags or {})}
        if condition:
            run_tags["condition"] = condition
        name = "-".join(x for x in (stage, (tags or {}).get("method") if stage == "evaluate" else None) if x)
        # system metrics (CPU, memory, and GPU where pynvml sees one) every 10 s, beside the stage's own
        # inside another stage_run (an evaluation's parent run) the run is nested under it
        with mlflow.start_run(run_name=f"{name}@{condition}" if condition else name, tags=run_tags,
                              nested=mlflow.active_run() is not None, log_system_metrics=True):
            mlflow.log_params(flatten(params))
            _check_artifact_store(mlflow, params)
            _log_datasets(mlflow, workspace, stage, condition)
            yield mlflow
            # the stage process's peak memory so far (ru_maxrss is KiB on Linux): what a worker must have
            mlflow.log_metric("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def channel_tiles(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] as RGB tiles [M, 3, H, W]: RGB as it is, gray repeated; a map of any other channel
    count (a plugin's) one gray tile per channel, channel by channel (with nrow=N, one row per channel)."""
    if x.shape[1] == 3:
        return x
    if x.shape[1] != 1:
        x = x.transpose(0, 1).reshape(-1, 1, *x.shape[2:])
    return x.expand(-1, 3, -1, -1)


# what a stage reads, as MLflow dataset inputs (the run's Datasets column): which data made this model
DATASETS = ("data/prepared", "data/conditions/{condition}")


def _log_datasets(mlflow, workspace: Path, stage: str, condition: str | None) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    context = "evaluation" if stage.startswith(("evaluate", "reference", "report")) else "training"
    for pattern in DATASETS:
        if "{condition}" in pattern and not condition:
            continue
        folder = workspace / pattern.format(condition=condition)
        if stage == "data" or not folder.is_dir():
            continue
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both readings are the local one
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(folder.resolve()))  # where the stage read it
        mlflow.log_input(MetaDataset(source, name=pattern.format(condition=condition), digest=folder_digest(folder)),
                         context=context)


def folder_digest(folder: Path, sample: int = 1 << 20) -> str:
    """A short fingerprint of a folder's files: names, sizes and their first `sample` bytes (MLflow's
    dataset digests sample the data the same way; a full hash of sd15's data would take minutes)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}:".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(sample))
    return digest.hexdigest()[:12]


def _process_tags() -> dict[str, str]:
    """Where the run's process is (so a later stage can tell it died), and the flow run that started it."""
    import socket

    import psutil

    me = psutil.Process()
    tags = {"host": socket.gethostname(), "pid": str(me.pid), "pid_started": repr(me.create_time())}
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    return tags


def fail_abandoned_runs(client, experiment_id: str) -> list[str]:
    """Runs this host left `RUNNING` whose process is gone (a killed stage or worker) are marked `FAILED`,
    with a `failure` tag saying why; runs of other hosts are left alone. Returns the runs marked."""
    import socket

    import psutil

    host, marked = socket.gethostname(), []
    for run in client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.host = '{host}'"):
        pid, started = run.data.tags.get("pid"), run.data.tags.get("pid_started")
        if pid is None:
            continue
        try:
            alive = repr(psutil.Process(int(pid)).create_time()) == started  # not a new process with an old PID
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            client.set_tag(run.info.run_id, "failure", f"its process {pid} on {host} ended without finishing the run")
            client.set_terminated(run.info.run_id, "FAILED")
            log.warning(f"MLflow run {run.info.run_name} ({run.info.run_id}) was left RUNNING by a lost process: marked FAILED")
            marked.append(run.info.run_id)
    return marked


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """uint8 HxWx3 grid of images or maps in [0,1] for `mlflow.log_image` (any channel count: `channel_tiles`)."""
    from torchvision.utils import make_grid

    grid = make_grid(channel_tiles(images.float().clamp(0, 1).cpu()), nrow=nrow, padding=1, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
