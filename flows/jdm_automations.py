"""Prefect automations that go with the jdm deployments: a flow-level retry after a lost worker.

A flow run whose worker is lost (a killed pod, a machine gone) stops sending heartbeats (Prefect's
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, 180 s by default) and would stay `Running` forever:

    jdm: crash runs without heartbeat   no heartbeat (nor an end) for two heartbeat periods: marked Crashed
    jdm: run crashed runs again         a crashed run of the `jdm` flow goes back to its work pool's queue
                                        (AwaitingRetry); a worker runs it again, and its stage resumes
                                        from its own checkpoint instead of starting over

The flows refuse a run past `LOST_WORKER_RETRIES` such retries (flows/jdm_flows.py): a crash that
comes back each time is not a lost worker. `infra/services.py serve` applies them to its server; for
another server: `PREFECT_API_URL=... python flows/jdm_automations.py` (the heartbeat period is the
Prefect setting's, as the workers' flow runs see it, unless `--heartbeat` says otherwise).
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

LOST_WORKER_RETRIES = 2
FLOW_RUNS = ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"})
JDM_FLOW = ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": "jdm"})
ENDS = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}


def automations(heartbeat_seconds: int) -> list[AutomationCore]:
    """The two automations, for flow runs that beat every `heartbeat_seconds`."""
    silent = 2 * heartbeat_seconds
    crash = AutomationCore(
        name="jdm: crash runs without heartbeat",
        description=f"A jdm flow run with neither a heartbeat nor an end for {silent} s lost its worker",
        trigger=EventTrigger(after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ENDS},
                             match=FLOW_RUNS, match_related=JDM_FLOW, for_each={"prefect.resource.id"},
                             posture=Posture.Proactive, threshold=1, within=timedelta(seconds=silent)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {silent} s: its worker was lost")])
    retry = AutomationCore(
        name="jdm: run crashed runs again",
        description=f"A crashed jdm flow run is queued again, at most {LOST_WORKER_RETRIES} times",
        trigger=EventTrigger(expect={"prefect.flow-run.Crashed"}, match=FLOW_RUNS, match_related=JDM_FLOW,
                             posture=Posture.Reactive, threshold=1),
        # a crashed run is final: only a forced transition puts it back in the queue
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                                    message="crashed (a lost worker): queued again, to resume from the checkpoint")])
    return [crash, retry]


def apply(heartbeat_seconds: int) -> list[str]:
    """Create the automations on the server PREFECT_API_URL names, replacing those of the same names."""
    from prefect import get_client

    wanted = automations(heartbeat_seconds)
    with get_client(sync_client=True) as client:
        for automation in wanted:
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            client.create_automation(automation)
    return [a.name for a in wanted]


if __name__ == "__main__":
    from prefect.settings import get_current_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heartbeat", type=int, default=get_current_settings().flows.heartbeat_frequency or 180,
                        help="seconds between the flow runs' heartbeats (default: PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")
    heartbeat = parser.parse_args().heartbeat
    for name in apply(heartbeat):
        print(f"automation {name!r} applied (heartbeat every {heartbeat} s)")
