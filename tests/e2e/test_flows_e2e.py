"""The flows' command runner streams a stage's output into the flow run's log line by line as it is
printed (a run of hours shows progress in the Prefect UI), and a failure quotes the output's tail; the
reproduce flow runs independent stages side by side with `jobs`."""

import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from ..conftest import REPO

sys.path.insert(0, str(REPO / "flows"))
from jdm_flows import _run, reproduce  # noqa: E402

SLOW_STAGE = ("import sys, time; print('first', flush=True); time.sleep(2); print('second'); "
              "print('to stderr', file=sys.stderr)")


@flow(name="runner-check")
def runs(ws: str, code: str) -> None:
    from pathlib import Path

    _run([sys.executable, "-c", code], Path(ws))


@pytest.mark.e2e
def test_output_is_logged_line_by_line_as_it_is_printed(tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    (tmp_path / ".dvc").mkdir()
    with prefect_test_harness():
        state = runs(str(tmp_path), SLOW_STAGE, return_state=True)
        assert state.is_completed()
        APILogWorker.drain_all(timeout=30)  # logs go to the API in the background, in batches
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        at = {log.message: log.timestamp for log in logs}
        assert {"first", "second", "to stderr"} <= set(at)
        # logged when printed: two seconds apart, not together when the process ended
        assert (at["second"] - at["first"]).total_seconds() >= 1.5
        failed = runs(str(tmp_path), "print('what went wrong'); raise SystemExit(3)", return_state=True)
        assert failed.is_failed()
        with pytest.raises(RuntimeError, match="failed with exit code 3:\nwhat went wrong"):
            failed.result()


@pytest.mark.e2e
def test_reproduce_with_two_jobs_runs_independent_stages_side_by_side(tmp_path):
    """On infra/repro.py's four-stage project (a -> b, c -> d) with a valid params.yaml: `jobs=0` fails the
    flow run before any stage, naming the value; `jobs=2` runs b and c at once and leaves DVC up to date."""
    from jdm.profiles import render_profile

    from ..unit.test_repro import stamps, write_project

    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    write_project(tmp_path)
    (tmp_path / "params.yaml").write_text(render_profile("smoke"))
    with prefect_test_harness():
        refused = reproduce(workspace=str(tmp_path), jobs=0, return_state=True)
        assert refused.is_failed() and not (tmp_path / "stamps").exists()
        with pytest.raises(ValueError, match="jobs=0: .* 1 or more"):
            refused.result()
        reproduce(workspace=str(tmp_path), jobs=2)
    t = stamps(tmp_path)
    assert t["b"]["start"] < t["c"]["end"] and t["c"]["start"] < t["b"]["end"], "b and c did not overlap"
    assert max(t["b"]["end"], t["c"]["end"]) <= t["d"]["start"]
    status = subprocess.run([dvc, "status"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "up to date" in status
