"""Local services, one command: a Prefect server, a `process` work pool with a worker, the
deployments of prefect.yaml and the automations of flows/jdm_automations.py (a lost worker's flow run
runs again) applied, and an MLflow tracking server; all on 127.0.0.1.

    python infra/services.py serve [--prefect-port 4200] [--mlflow-port 5000]   # `make serve`
    python infra/services.py stop                                               # `make stop`

PIDs and logs live in `.services/` of the workspace; `stop` stops exactly the processes `serve`
started, by PID (each in its own process group), never by name. Prefect keeps its database in
PREFECT_HOME (default ~/.prefect) and `serve` points the active profile's PREFECT_API_URL at the
server (`stop` unsets it), so the README's `prefect deployment run ...` works in any shell.
MLflow keeps the workspace's store (`mlflow.db`, `mlartifacts/`), so runs logged before by
`dvc repro` show in the server too; `JDM_MLFLOW_ARTIFACTS=s3://bucket/prefix` (with
`MLFLOW_S3_ENDPOINT_URL` for MinIO or moto) puts artifacts in S3 instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from jdm.env import tool_env  # noqa: E402

POOL = "jdm-local"
LOCAL_DEPLOYMENTS = ("add-control", "text-to-image", "reproduce")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Services:
    def __init__(self, workspace: Path, state_dir: Path | None = None):
        self.workspace = Path(workspace).resolve()
        self.state = Path(state_dir or self.workspace / ".services").resolve()
        self.pids_file = self.state / "pids.json"

    # -- environment -------------------------------------------------------------------------
    def env(self, prefect_port: int, mlflow_port: int) -> dict[str, str]:
        """What every service, the worker and its flow runs see (the CLI too, via `make`)."""
        env = tool_env()
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env.update(PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api",
                   PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(prefect_port),
                   PREFECT_UI_API_URL=f"http://127.0.0.1:{prefect_port}/api",
                   MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
                   JDM_WORKSPACE=str(self.workspace))
        return env

    def _start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.state / "logs" / f"{name}.log", "ab")
        # a process group of its own: `stop` signals exactly this process and its children
        proc = subprocess.Popen(cmd, cwd=self.workspace, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self._record(name, proc.pid)
        return proc

    def _record(self, name: str, pid: int) -> None:
        pids = self.pids()
        pids[name] = pid
        self.pids_file.write_text(json.dumps(pids))

    def pids(self) -> dict[str, int]:
        return json.loads(self.pids_file.read_text()) if self.pids_file.is_file() else {}

    def _wait(self, name: str, url: str, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if _healthy(url):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        log = (self.state / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"{name} did not become healthy at {url} within {timeout:.0f} s:\n{log}")

    def _cli(self, cmd: list[str], env: dict) -> None:
        out = subprocess.run(cmd, cwd=self.workspace, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")

    # -- serve / stop ---------------------------------------------------------------------------
    def serve(self, prefect_port: int = 4200, mlflow_port: int = 5000, timeout: float = 180) -> dict[str, str]:
        if any(_alive(pid) for pid in self.pids().values()):
            raise RuntimeError(f"services already running (PIDs in {self.pids_file}); `make stop` first")
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        self.pids_file.write_text("{}")
        env = self.env(prefect_port, mlflow_port)
        bin_dir = os.path.dirname(sys.executable)
        prefect = self._start("prefect-server", [f"{bin_dir}/prefect", "server", "start", "--host", "127.0.0.1",
                                                 "--port", str(prefect_port)], env)
        artifacts = os.environ.get("JDM_MLFLOW_ARTIFACTS") or str(self.workspace / "mlartifacts")
        mlflow = self._start("mlflow-server", [f"{bin_dir}/mlflow", "server", "--host", "127.0.0.1",
                                               "--port", str(mlflow_port), "--workers", "1",
                                               "--backend-store-uri", f"sqlite:///{self.workspace / 'mlflow.db'}",
                                               "--artifacts-destination", artifacts], env)
        self._wait("prefect-server", f"http://127.0.0.1:{prefect_port}/api/health", prefect, timeout)
        # the active Prefect profile points at this server, so `prefect deployment run ...` works as
        # typed in any shell; `stop` unsets it again
        self._cli([f"{bin_dir}/prefect", "config", "set", f"PREFECT_API_URL={env['PREFECT_API_URL']}"], env)
        self._cli([f"{bin_dir}/prefect", "work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
        deploy = [f"{bin_dir}/prefect", "--no-prompt", "deploy"]
        for name in LOCAL_DEPLOYMENTS:
            deploy += ["--name", name]
        self._cli(deploy, env)
        # a lost worker's flow run is crashed when its heartbeats stop and queued again (flow-level retry)
        self._cli([sys.executable, str(self.workspace / "flows" / "jdm_automations.py")], env)
        self.start_worker(env)
        self._wait("mlflow-server", f"http://127.0.0.1:{mlflow_port}/health", mlflow, timeout)
        return {"prefect": f"http://127.0.0.1:{prefect_port}", "mlflow": f"http://127.0.0.1:{mlflow_port}"}

    def start_worker(self, env: dict) -> subprocess.Popen:
        """The process worker that runs the deployments' flow runs (again, after one was lost)."""
        prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
        return self._start("prefect-worker", [prefect, "worker", "start", "--pool", POOL, "--type", "process"], env)

    def stop(self, timeout: float = 20) -> list[str]:
        """Stop what `serve` started: the worker first (it stops on SIGINT, not SIGTERM), then the servers."""
        stopped = []
        for name, pid in sorted(self.pids().items(), key=lambda kv: kv[0] != "prefect-worker"):
            if not _alive(pid):
                continue
            sig = signal.SIGINT if name == "prefect-worker" else signal.SIGTERM
            _signal_group(pid, sig)
            deadline = time.time() + timeout
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                _signal_group(pid, signal.SIGKILL)
            stopped.append(name)
        if self.pids_file.is_file():
            self.pids_file.unlink()
            env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
            subprocess.run([os.path.join(os.path.dirname(sys.executable), "prefect"), "config", "unset",
                            "PREFECT_API_URL", "-y"], env=env, capture_output=True, timeout=60)
        return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group `serve` created for this process (pgid == pid)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--prefect-port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    serve.add_argument("--mlflow-port", type=int, default=int(os.environ.get("MLFLOW_PORT", 5000)))
    sub.add_parser("stop")
    args = parser.parse_args(argv)
    services = Services(Path.cwd())
    if args.command == "stop":
        stopped = services.stop()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    start = time.time()
    urls = services.serve(args.prefect_port, args.mlflow_port)
    print(f"ready in {time.time() - start:.0f} s\n"
          f"  Prefect UI : {urls['prefect']}\n  MLflow UI  : {urls['mlflow']}\n"
          f"Run a deployment (the active Prefect profile now points at this server):\n"
          f"  prefect deployment run jdm/add-control -p condition=hed --watch\n"
          f"  MLflow runs go to the server when MLFLOW_TRACKING_URI={urls['mlflow']} is set\n"
          f"Stop everything this started: make stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
