"""The pipeline's wall time: `dvc repro` in a fresh copy of the repository (what a clean clone gets),
each stage timed from DVC's own output, then a no-op `dvc repro`; and the peak memory of the largest
stage process (the maximum resident set of any process `dvc repro` waited for).

    python benchmarks/pipeline.py --profile smoke                 # the main pipeline, fresh
    python benchmarks/pipeline.py --profile tiny --target paper/dvc.yaml   # main + the paper's table
    python benchmarks/pipeline.py --workspace .                   # whatever is out of date here

Targets (issue 8, 2 cores): smoke 2 min, tiny main pipeline 60 min, `make paper` 3 h, no-op 15 s,
largest stage 4 GB. Writes benchmarks/results/pipeline_<profile>.json. Run alone.
"""

from __future__ import annotations

import argparse
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
STAGE = re.compile(r"Running stage '([^']+)'")
TARGETS = {"smoke_total_s": 120, "tiny_main_total_s": 3600, "tiny_paper_total_s": 3 * 3600, "noop_s": 15,
           "peak_rss_mb": 4096}


def timed_repro(work: Path, target: str | None, env: dict) -> tuple[dict[str, float], float]:
    """Seconds per stage DVC ran (from one 'Running stage' line to the next, or the end) and in total."""
    cmd = [str(BIN / "dvc"), "repro", *([target] if target else [])]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages, current, since = {}, None, start
    for line in proc.stdout:
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--target", default=None, help="a dvc.yaml to reproduce (default: the main pipeline)")
    ap.add_argument("--workspace", type=Path, default=None, help="time `dvc repro` here instead of in a fresh copy")
    ap.add_argument("--keep", action="store_true", help="keep the fresh copy (its path is printed)")
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
        stages, total = timed_repro(work, args.target, env)
        _, noop = timed_repro(work, args.target, env)
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    profile = args.profile if args.workspace is None else "workspace"
    result = {"profile": profile, "target": args.target or "dvc.yaml", "fresh": args.workspace is None,
              "stages_s": stages, "total_s": total, "noop_s": noop, "peak_rss_mb": peak_mb,
              "cpus": os.cpu_count(), "targets": TARGETS, "machine": machine()}
    out = write_result(f"pipeline_{profile}" + ("_paper" if args.target else ""), result)
    for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"{seconds:8.1f} s  {name}")
    print(f"{len(stages)} stages in {total:.0f} s ({total / 60:.1f} min); no-op `dvc repro` {noop:.1f} s; "
          f"largest process {peak_mb:.0f} MB -> {out}")
    if tmp and args.keep:
        print(f"workspace kept: {work}")


if __name__ == "__main__":
    main()
