"""A team's storage on a real S3 API (moto_server on loopback): MLflow artifacts land in the bucket,
and `dvc push` / `dvc pull` round-trips the pipeline's outputs byte for byte. No credential reaches
a file the project commits, or a log."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ..conftest import REPO
from .conftest import run, stop, wait_http

sys.path.insert(0, str(REPO / "infra"))
from services import free_port  # noqa: E402

SECRET = f"jdm-{uuid.uuid4().hex}"  # made here, so no file holds it unless the code under test wrote it


@pytest.fixture
def s3(tmp_path):
    import boto3

    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "jdm-test", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=open(tmp_path / "moto.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint, proc)
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="jdm-test", aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    client.create_bucket(Bucket="jdm-team")
    yield endpoint, client, env
    stop(proc)


def mlflow_server(tmp_path, env, s3_endpoint):
    """A team's MLflow server on a free loopback port, artifacts to the bucket at `s3_endpoint`; healthy."""
    port = free_port()
    server_env = {**env, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'team.db'}",
                               "--artifacts-destination", "s3://jdm-team/mlflow"],
                              stdout=open(tmp_path / "mlflow.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True, env=server_env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server)
    except BaseException:
        stop(server)
        raise
    return server, port


class DroppingEndpoint:
    """A TCP relay to `target` that goes away for good once `budget` bytes have gone up through it:
    an S3 endpoint lost in the middle of a push (listening socket and open connections closed)."""

    def __init__(self, target_port: int, budget: int):
        import socket
        import threading

        self.target, self.budget, self.sent, self.closed = target_port, budget, 0, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns, self.lock = [], threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, upward):
        try:
            while data := src.recv(65536):
                if upward:
                    with self.lock:
                        self.sent += len(data)
                    if self.sent > self.budget:
                        self.close()
                        return
                dst.sendall(data)
        except OSError:
            pass

    def close(self):
        import socket

        self.closed.set()
        with self.lock:
            for sock in [self.listener, *self.conns]:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def digest(paths):
    out = {}
    for root in paths:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.e2e
def test_mlflow_artifacts_and_dvc_outputs_live_in_s3(s3, smoke_workspace, tmp_path):
    endpoint, client, env = s3
    work = smoke_workspace

    # MLflow: a tracking server whose artifacts go to the bucket; a stage logs through it
    from mlflow import MlflowClient

    server, mlflow_port = mlflow_server(tmp_path, env, endpoint)
    try:
        # the stage runs with the S3 credential in its environment (a user's shell often has it): the
        # artifacts still go through the server, and the secret must appear in nothing the run records
        stage_env = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
        out = run(["jdm", "conditions", "sr"], work, env=stage_env)
        tracking = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        [logged] = tracking.search_runs([tracking.get_experiment_by_name("jdm").experiment_id])
        recorded = json.dumps([logged.data.params, logged.data.tags, logged.data.metrics])
        recorded += Path(tracking.download_artifacts(logged.info.run_id, "params.json", str(tmp_path))).read_text()
    finally:
        stop(server)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="jdm-team", Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith("sr_maps.png") for k in keys), keys
    assert '"stage": "conditions"' in recorded and "conditions.sr_factor" in recorded  # what was scanned
    assert SECRET not in out.stdout + out.stderr + recorded

    # DVC: push to the bucket, lose the cache and the outputs, pull them back
    run(["dvc", "commit", "-f", "dvc.yaml"], work, env=env)  # `jdm conditions sr` above ran outside DVC
    outputs = [work / p for p in ("data/prepared", "models/teacher", "models/jdm/generator", "data/conditions/hed")]
    before, cache = digest(outputs), digest([work / ".dvc" / "cache"])
    # the endpoint goes away after 1 MB of the push: bounded retries, an error naming it, nothing local lost
    lost = DroppingEndpoint(int(endpoint.rsplit(":", 1)[1]), budget=1_000_000)
    run(["make", "-s", "remote", "S3_URL=s3://jdm-team/dvc", f"S3_ENDPOINT=http://127.0.0.1:{lost.port}"], work, env=env)
    started = time.monotonic()
    cut = subprocess.run(["dvc", "push", "dvc.yaml"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert lost.closed.is_set() and cut.returncode != 0, (lost.sent, cut.stdout[-2000:])
    assert f"127.0.0.1:{lost.port}" in cut.stdout + cut.stderr and took < 120, (took, cut.stderr[-2000:])
    assert digest(outputs) == before and digest([work / ".dvc" / "cache"]) == cache
    # the endpoint back: the push completes what was cut, and the pull below proves every object whole
    run(["make", "-s", "remote", "S3_URL=s3://jdm-team/dvc", f"S3_ENDPOINT={endpoint}"], work, env=env)
    pushed = run(["make", "-s", "push", "ARGS=dvc.yaml"], work, env=env)  # the main pipeline (paper/ has not run)
    assert "new" not in run(["dvc", "status", "--cloud", "dvc.yaml"], work, env=env).stdout
    assert any(o["Key"].startswith("dvc/") for o in client.list_objects_v2(Bucket="jdm-team").get("Contents", []))
    shutil.rmtree(work / ".dvc" / "cache")
    for p in outputs:
        shutil.rmtree(p)
    pulled = run(["dvc", "pull", "dvc.yaml"], work, env=env)
    assert digest(outputs) == before

    # no credential in anything the project commits or prints
    committed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=work, capture_output=True,
                               text=True).stdout.split()
    for rel in committed + [".dvc/config"]:
        p = work / rel
        if p.is_file() and p.stat().st_size < 5_000_000:
            assert SECRET.encode() not in p.read_bytes(), rel
    assert SECRET not in pushed.stdout + pushed.stderr + pulled.stdout + pulled.stderr
    assert "endpointurl" in (work / ".dvc" / "config.local").read_text()


@pytest.mark.e2e
def test_unreachable_endpoints_fail_fast_naming_them_and_keep_outputs(s3, smoke_workspace, tmp_path):
    """A tracking server that is down, an S3 endpoint down behind a live tracking server, a DVC remote
    that does not answer: each stops with a message naming the endpoint, before the stage touches its
    outputs (MLflow) or without touching them (DVC)."""
    work = smoke_workspace
    outputs = [work / "data" / "conditions" / "sr", work / "models" / "teacher"]
    before = digest(outputs)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    stage_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def failing(cmd, env):
        out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode != 0, out.stdout[-2000:]
        return out.stdout + out.stderr

    # the tracking server is down
    message = failing(["jdm", "conditions", "sr"], {**stage_env, "MLFLOW_TRACKING_URI": closed})
    assert f"MLflow tracking server {closed} is unreachable" in message, message[-2000:]
    assert "Traceback" not in message  # a user's error, said in one line

    # the tracking server is up, the S3 endpoint behind it is not: fails at the first artifact, in seconds
    server, mlflow_port = mlflow_server(tmp_path, s3[2], closed)
    try:
        started = time.monotonic()
        message = failing(["jdm", "conditions", "sr"], {**stage_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"})
        took = time.monotonic() - started
    finally:
        stop(server)
    assert "MLflow artifact store mlflow-artifacts:/" in message and f"127.0.0.1:{mlflow_port}" in message, message[-2000:]
    assert took < 120, f"{took:.0f} s: the artifact check waited on MLflow's retries"

    # the DVC remote does not answer: DVC names it after bounded retries (jdm/env.py) per object it looks
    # up; untargeted, that is every output of paper/dvc.lock this workspace lacks (about 2 minutes), so
    # `make push` asks the endpoint once first and stops in seconds
    cache = digest([work / ".dvc" / "cache"])
    run(["make", "-s", "remote", "S3_URL=s3://jdm-team/dvc", f"S3_ENDPOINT={closed}"], work, env=s3[2])
    message = failing(["dvc", "push", "dvc.yaml"], s3[2])
    assert closed in message, message[-2000:]
    started = time.monotonic()
    message = failing(["make", "-s", "push"], s3[2])
    took = time.monotonic() - started
    assert f"DVC remote 'team' (s3://jdm-team/dvc) is unreachable at {closed} after 3 attempts" in message, message
    assert took < 30 and "Traceback" not in message, f"{took:.0f} s"
    run(["dvc", "remote", "remove", "--local", "team"], work, env=s3[2])

    assert digest(outputs) == before and digest([work / ".dvc" / "cache"]) == cache


@pytest.mark.e2e
def test_two_workspaces_share_state_through_the_dvc_remote(s3, smoke_workspace, tmp_path, monkeypatch):
    """Two workers as two pods would be: separate clones, one S3 remote. The first's add-control of the
    primary condition pushes the warm-up (outputs, run cache, metrics); the second's add-control hed restores
    data, teacher and warm-up from the remote instead of training them, trains hed and pushes it; the first,
    without its own hed ControlNet, pulls the second's byte-identical. Then both push to one empty remote at
    once, and a third pulls everything from it."""
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from .conftest import lose_output, workspace_copy

    endpoint, client, env = s3
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])  # the flows run in this process; their DVC commands inherit it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    remote = ["make", "-s", "remote", "S3_URL=s3://jdm-team/dvc", f"S3_ENDPOINT={endpoint}"]
    first = smoke_workspace
    run(remote, first, env=env)
    second = workspace_copy(tmp_path / "second")
    run(["jdm", "profile", "smoke"], second, env=env)
    run(remote, second, env=env)
    sys.path.insert(0, str(REPO / "flows"))
    from jdm_flows import add_control

    with prefect_test_harness():
        add_control(condition="canny", workspace=str(first))  # the warm-up is up to date: pushed, not trained
        add_control(condition="hed", workspace=str(second))
    tracked = mlflow.MlflowClient(f"sqlite:///{second / 'mlflow.db'}")
    stages = [r.data.tags["stage"] for r in tracked.search_runs([tracked.get_experiment_by_name("jdm").experiment_id])]
    assert "warmup" not in stages and "teacher" not in stages and "data" not in stages, stages  # restored
    assert stages.count("extend") == 1
    def files(ws, *outputs):  # each file's digest, by its path inside the workspace
        return {k.removeprefix(str(ws)): v for k, v in digest([ws / o for o in outputs]).items()}

    shared = ("models/teacher", "models/jdm/generator", "models/jdm/fake_score")
    assert files(first, *shared) == files(second, *shared)
    lose_output(first, "extend@hed", "models/jdm/controlnet-hed")
    run(["dvc", "pull", "extend@hed"], first, env=env)
    assert files(first, "models/jdm/controlnet-hed") == files(second, "models/jdm/controlnet-hed")

    # two workers pushing at once lose nothing: both push to an empty remote at the same time, objects they
    # share (data, teacher, warm-up, hed) and objects one alone has (the first's other stages); a third
    # workspace pulls the whole pipeline from it, byte-identical to the first's
    for ws in (first, second):
        run(["dvc", "remote", "add", "--local", "--force", "mirror", "s3://jdm-team/mirror"], ws, env=env)
        run(["dvc", "remote", "modify", "--local", "mirror", "endpointurl", endpoint], ws, env=env)
    pushes = [subprocess.Popen(["dvc", "push", "--run-cache", "-r", "mirror", *targets], cwd=ws, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
              for ws, targets in ((first, []), (second, ["--with-deps", "extend@hed"]))]
    outputs = [p.communicate(timeout=600)[0] for p in pushes]
    assert [p.returncode for p in pushes] == [0, 0], outputs
    third = workspace_copy(tmp_path / "third")
    run(["jdm", "profile", "smoke"], third, env=env)
    shutil.copy(first / "dvc.lock", third / "dvc.lock")  # a clone of the first's commit of its lock
    run(["dvc", "remote", "add", "--local", "--default", "mirror", "s3://jdm-team/mirror"], third, env=env)
    run(["dvc", "remote", "modify", "--local", "mirror", "endpointurl", endpoint], third, env=env)
    run(["dvc", "pull", "dvc.yaml"], third, env=env)  # the main pipeline (paper/ and seeds/ locks are tiny's)
    assert files(third, "data", "models") == files(first, "data", "models")
