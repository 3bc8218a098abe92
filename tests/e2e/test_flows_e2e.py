"""The flows' command runner streams a stage's output into the flow run's log line by line as it is
printed (a run of hours shows progress in the Prefect UI), and a failure quotes the output's tail."""

import sys

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from ..conftest import REPO

sys.path.insert(0, str(REPO / "flows"))
from jdm_flows import _run  # noqa: E402

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
