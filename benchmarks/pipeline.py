"""The pipeline's wall time: `dvc repro` in a fresh copy of the repository (what a clean clone gets),
each stage timed from DVC's own output, then a no-op `dvc repro`; and the peak memory of the largest
stage process (the maximum resident set of any process `dvc repro` waited for).

    python benchmarks/pipeline.py --profile smoke                 # the main pipeline, fresh
    python benchmarks/pipeline.py --profile tiny --target paper/dvc.yaml   # main + the paper's table
    python benchmarks/pipeline.py --workspace .                   # whatever is out of date here
    python benchmarks/pipeline.py --profile smoke --jobs 2        # two stages at a time (infra/repro.py)

Targets (issue 8, 2 cores): smoke 2 min, tiny main pipeline 60 min, `make paper` 3 h, no-op 15 s,
largest stage 4 GB. Writes benchmarks/results/pipeline_<profile>[_jobs<N>].json. Run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent / "infra")]
from shapes import machine, write_result  # noqa: E402
from workspace import clean_copy  # noqa: E402

BIN = Path(sys.executable).parent
REPRO = Path(__file__).resolve().parent.parent / "infra" / "repro.py"
STAGE = re.compile(r"Running stage '([^']+)'")
STAGE_DONE = re.compile(r"\] done (\S+) in ([0-9.]+) s")  # infra/repro.py's line for a finished stage
TARGETS = {"smoke_total_s": 120, "tiny_main_total_s": 3600, "tiny_paper_total_s": 3 * 3600, "noop_s": 15,
           "peak_rss_mb": 4096}


def timed_repro(work: Path, target: str | None, env: dict, jobs: int) -> tuple[dict[str, float], float]:
    """Seconds per stage DVC ran (from one 'Running stage' line to the next, or the end; with jobs > 1,
    infra/repro.py's own time for each stage) and in total."""
    if jobs > 1:
        cmd = [str(BIN / "python"), str(REPRO), "--jobs", str(jobs), *([target] if target else [])]
    else:
        cmd = [str(BIN / "dvc"), "repro", *([target] if target else [])]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages, current, since = {}, None, start
    for line in proc.stdout:
        done = STAGE_DONE.search(line)
        if done:
            stages[done.group(1)] = float(done.group(2))
            print(line.rstrip(), flush=True)
        m = STAGE.search(line)
        if m:
            now = time.monotonic()
            if current:
                stages[current] = now - since
            current, since = m.group(1), now
            print(f"[{now - start:7.1f} s] {m.group(1)}", flush=True)
    if proc.wait():
        raise SystemExit(f"`{' '.join(cmd)}` failed in {work} (exit {proc.returncode})")
    end = time.monotonic()
    if current:
        stages[current] = end - since
    return stages, end - start


# what the run scored, kept beside its time: the trained bytes depend on the torch thread count, which
# --jobs changes, so a run at another count is also a measure of how far that alone moves the numbers
HEADLINE = ("fid_inception", "kid_inception", "fid_classifier", "consistency", "consistency_judge", "prompt_accuracy")


def headline_metrics(work: Path) -> dict[str, dict[str, float]]:
    """{"jdm-hed": {"fid_inception": ...}, ...}: the main pipeline's evaluate files of the workspace."""
    return {path.stem: {k: v for k, v in json.loads(path.read_text()).items() if k in HEADLINE}
            for path in sorted((work / "metrics" / "eval").glob("*.json"))
            if path.stem.startswith(("jdm-", "controlnet-50-"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--target", default=None, help="a dvc.yaml to reproduce (default: the main pipeline)")
    ap.add_argument("--workspace", type=Path, default=None, help="time `dvc repro` here instead of in a fresh copy")
    ap.add_argument("--keep", action="store_true", help="keep the fresh copy (its path is printed)")
    ap.add_argument("--jobs", type=int, default=1, help="stages at a time: >1 runs infra/repro.py --jobs N")
    args = ap.parse_args()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # each workspace records into its own mlflow.db
    tmp = None
    if args.workspace is None:
        tmp = Path(tempfile.mkdtemp(prefix="jdm-bench-"))
        work = clean_copy(tmp / "repo")
        subprocess.run([str(BIN / "jdm"), "profile", args.profile, "--force"], cwd=work, env=env, check=True)
    else:
        work = args.workspace.resolve()
    try:
        stages, total = timed_repro(work, args.target, env, args.jobs)
        _, noop = timed_repro(work, args.target, env, args.jobs)
        scored = headline_metrics(work)
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    profile = args.profile if args.workspace is None else "workspace"
    result = {"profile": profile, "target": args.target or "dvc.yaml", "fresh": args.workspace is None,
              "jobs": args.jobs, "stages_s": stages, "total_s": total, "noop_s": noop, "peak_rss_mb": peak_mb,
              "cpus": os.cpu_count(), "targets": TARGETS, "machine": machine(), "metrics_eval": scored}
    out = write_result(f"pipeline_{profile}" + ("_paper" if args.target else "") +
                       (f"_jobs{args.jobs}" if args.jobs > 1 else ""), result)
    for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"{seconds:8.1f} s  {name}")
    print(f"{len(stages)} stages in {total:.0f} s ({total / 60:.1f} min, {args.jobs} at a time); no-op {noop:.1f} s; "
          f"largest process {peak_mb:.0f} MB -> {out}")
    if tmp and args.keep:
        print(f"workspace kept: {work}")


if __name__ == "__main__":
    main()
