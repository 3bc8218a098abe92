"""`dvc repro` with independent stages side by side, each a `dvc repro --single-item` of its own.

DVC runs one stage at a time, but it releases its repository lock while a stage's command runs and
locks each stage's deps (read) and outs (write) on their own, so two `dvc repro` processes can run two
stages whose files do not overlap. This starts a stage as soon as every stage it depends on has
finished, up to `--jobs` at once (the one with the most stages downstream of it first), with
`--wait-for-lock` so each waits for the other's bookkeeping instead of failing. Each stage is still
DVC's: it skips what did not change, restores from the run cache, writes dvc.lock. A failed stage
stops what depends on it; the rest finish, and the exit status is 1.

On two cores, two one-thread stages side by side beat one two-thread stage at a time (docs/performance.md):
each stage gets `cores // jobs` torch threads through OMP_NUM_THREADS (unless set), which the stages'
`threads: 0` follows. Trained bytes depend on the thread count (float rounding), and DVC does not
record it: a run at `--jobs 2` gives other bytes than one at `--jobs 1` on this machine.

    python infra/repro.py --jobs 2                    # dvc.yaml: what `make run` runs (JOBS=2, its default)
    python infra/repro.py --jobs 2 paper/dvc.yaml     # the paper's tables: `make paper`
    python infra/repro.py --jobs 2 --pull             # each stage `dvc repro --pull`: restored from a remote if it can be

With more than one job, each stage's output goes to .dvc/tmp/repro/<stage>.log; a failure prints its end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOGS = Path(".dvc/tmp/repro")
FAILED_TAIL = 40  # lines of a failed stage's log printed


@dataclass
class Plan:
    """The stages to reproduce, by DVC address (`extend@hed`, `paper/dvc.yaml:di`), dependencies first,
    and for each the stages of the plan it depends on."""
    order: list[str]
    needs: dict[str, set[str]]

    def downstream(self) -> dict[str, int]:
        """How many stages of the plan wait on each, directly or not: the most-waited-on starts first."""
        below: dict[str, set[str]] = {}
        for stage in reversed(self.order):  # its dependents come later in the order: already counted
            below[stage] = set().union(*({t} | below[t] for t in self.order if stage in self.needs[t]))
        return {stage: len(b) for stage, b in below.items()}


def plan(targets: list[str], root: Path) -> Plan:
    """What `dvc repro <targets>` would run, from DVC's own graph and status: the stages of the targets
    and upstream of them that changed, and every stage downstream of those (their deps are about to
    change). A stage in neither is up to date and is not started at all."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.lock:
        stages = {s for t in targets for s in repo.stage.collect(t, with_deps=True)}
        graph = repo.index.graph.subgraph(stages)  # an edge goes from a stage to a stage it depends on
        run = {s for s in stages if s.changed()}
        run |= {d for s in run for d in nx.ancestors(graph, s)}  # ancestors here: what depends on s
        order = [s for s in reversed(list(nx.topological_sort(graph))) if s in run]
        return Plan([s.addressing for s in order],
                    {s.addressing: {d.addressing for d in graph.successors(s) if d in run} for s in order})


def log_path(root: Path, stage: str) -> Path:
    return root / LOGS / f"{stage.replace('/', '_')}.log"


def stage_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def run(the_plan: Plan, jobs: int, root: Path, dvc: str = "dvc", pull: bool = False) -> int:
    """Run the plan's stages, `jobs` at a time; 0 when every one succeeded. With `pull`, each is
    `dvc repro --pull`: a stage whose outputs the remote or its run cache holds is restored, not run."""
    pending, running, done, failed = list(the_plan.order), {}, set(), set()
    env, start, downstream = stage_env(jobs), time.monotonic(), the_plan.downstream()
    (root / LOGS).mkdir(parents=True, exist_ok=True)

    def stamp() -> str:
        return f"[{time.monotonic() - start:7.1f} s]"

    try:
        while pending or running:
            blocked = [s for s in pending if the_plan.needs[s] & failed]
            for stage in blocked:  # upstream failed: never runs, and neither does what waits on it
                pending.remove(stage)
                failed.add(stage)
                print(f"{stamp()} not run: {stage} (a stage it depends on failed)", flush=True)
            ready = sorted((s for s in pending if the_plan.needs[s] <= done),
                           key=lambda s: -downstream[s])
            for stage in ready[:max(0, jobs - len(running))]:
                pending.remove(stage)
                cmd = [dvc, "--wait-for-lock", "repro", "--single-item", *(["--pull"] if pull else []), stage]
                log = None if jobs == 1 else open(log_path(root, stage), "w")  # one job: its output as it comes
                proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
                running[stage] = (proc, log, time.monotonic())
                print(f"{stamp()} start {stage}", flush=True)
            if not running:  # nothing ready, nothing running: what is left waits on no stage of the plan
                break
            time.sleep(0.2)
            for stage, (proc, log, since) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[stage]
                if log:
                    log.close()
                seconds = time.monotonic() - since
                if proc.returncode == 0:
                    done.add(stage)
                    print(f"{stamp()} done {stage} in {seconds:.1f} s", flush=True)
                else:
                    failed.add(stage)
                    print(f"{stamp()} FAILED {stage} (exit {proc.returncode}) after {seconds:.1f} s", flush=True)
                    if log:
                        lines = log_path(root, stage).read_text().splitlines()
                        print("\n".join("    " + line for line in lines[-FAILED_TAIL:]), flush=True)
    except KeyboardInterrupt:
        for proc, _, _ in running.values():  # DVC stops the stage's command and unlocks on SIGINT
            proc.send_signal(signal.SIGINT)
        for proc, _, _ in running.values():
            proc.wait()
        return 130
    print(f"{stamp()} {len(done)} stages done, {len(failed) + len(pending)} failed or not run", flush=True)
    return 1 if failed or pending else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", default=["dvc.yaml"], help="stages or dvc.yaml files (default: dvc.yaml)")
    ap.add_argument("--jobs", "-j", type=int, default=2, help="stages at once (default 2)")
    ap.add_argument("--pull", action="store_true", help="each stage as `dvc repro --pull` (outputs and run cache "
                                                         "from the default remote)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: the number of stages at once must be 1 or more")
    root = Path.cwd()
    return run(plan(args.targets, root), args.jobs, root, str(Path(sys.executable).parent / "dvc"), args.pull)


if __name__ == "__main__":
    sys.exit(main())
