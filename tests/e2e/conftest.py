import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from ..conftest import REPO

# no pooled SQLite connections in the test process (MLflow's own setting): each MLflow session opens
# mlflow.db anew, so none outlives the file a test's workspace restore replaces (an earlier test's
# in-process client otherwise wrote to the deleted file: "attempt to write a readonly database")
os.environ["MLFLOW_SQLALCHEMYSTORE_POOLCLASS"] = "NullPool"


def workspace_copy(dst):
    """The repository as a clean clone would have it (tracked and untracked-but-not-ignored files)."""
    sys.path.insert(0, str(REPO / "infra"))
    from workspace import clean_copy
    return clean_copy(dst)


def run(cmd, cwd, timeout=600, env=None):
    env = env or {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="session")
def smoke_build(tmp_path_factory):
    """One smoke `dvc repro` in a temporary copy of the repository, once per session, and a snapshot of
    the result that no test touches. Tests take it through `smoke_workspace`."""
    base = tmp_path_factory.mktemp("e2e")
    work = workspace_copy(base / "repo")
    run(["jdm", "profile", "smoke"], work)
    run(["dvc", "repro"], work, timeout=1500)  # 3-6 minutes alone; a busy machine takes longer
    shutil.copytree(work, base / "built", symlinks=True)
    return work, base / "built"


@pytest.fixture
def smoke_workspace(smoke_build):
    """The smoke workspace as `dvc repro` left it, for this test alone: what an earlier test changed there
    (outputs retrained by hand, MLflow runs, checkpoints, params files) is put back from the snapshot
    first, so no test depends on which ran before it, or on whether it passed. Always the same path:
    mlflow.db (the experiment's artifact location) and DVC's state hold absolute paths. Fresh mtimes, so
    DVC hashes every output again instead of trusting what it recorded for a file the last test wrote."""
    work, built = smoke_build
    shutil.rmtree(work)
    shutil.copytree(built, work, symlinks=True, copy_function=shutil.copy)
    return work


def params_file(work, name, **sections):
    """A variant of the workspace's params.yaml (sections updated, or top-level keys replaced)."""
    import yaml
    raw = yaml.safe_load((work / "params.yaml").read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    (work / name).write_text(yaml.safe_dump(raw))
    return name


def lose_output(work, stage, path):
    """An output gone from the workspace and from DVC's cache (as on a clone without the remote): `dvc repro`
    must run its stage again. Deleting the folder alone is not enough: DVC checks it out from the cache."""
    import shutil

    from dvc.repo import Repo

    with Repo(str(work)) as repo:
        out = next(o for o in repo.stage.collect(f"{work / 'dvc.yaml'}:{stage}")[0].outs if o.def_path == path)
        # a folder's manifest (`<md5>.dir`): without it the folder cannot be checked out; its files stay orphans
        os.remove(repo.cache.local.oid_to_path(out.hash_info.value))
    shutil.rmtree(work / path)


def wait_http(url, proc, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
            time.sleep(0.3)
    raise TimeoutError(url)


def stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)  # the group this test started, by PID
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def launch_and_kill_after_checkpoints(cmd, cwd, checkpoints, timeout=300):
    """Start `cmd` (an `accelerate launch` of two processes) and kill it, launcher and every worker by PID
    (torchrun's workers have their own process groups), once each process has a checkpoint in
    `checkpoints`/process-<i>; fail if it ended before that."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the workspace's store, as `run`'s
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    saved = lambda: all(list((checkpoints / f"process-{i}").glob("step-*.safetensors")) for i in (0, 1))  # noqa: E731
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not saved():
        time.sleep(0.05)
    tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=30)
    assert saved(), "killed too late"


def resumed_steps(output):
    """[(step, process)] of each 'resumed from' line; the two processes print at once, so their lines may
    share one: match the messages, not lines."""
    import re
    return re.findall(r"resumed from the checkpoint of step (\d+) in \S*process-(\d)", output)

