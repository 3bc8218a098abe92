"""Run one training stage of the main pipeline under several settings, one after the other, and keep what
each wrote: its metrics file and its validation curve, under metrics/sweeps/<stage>/<label>/, plus one
row per setting in metrics/sweeps/<stage>.json (the trade-off plot: `dvc plots show
metrics/sweeps/warmup.json -x fid_classifier -y consistency`).

    python infra/sweep.py warmup --grid jdm.condition_weight=0.1,0.3,1 --fixed jdm.real_guidance_scale=3
    python infra/sweep.py extend-sr --grid jdm.condition_weight=0.1,1   # on the warm-up's generator in models/jdm
    python infra/sweep.py di --grid jdm.generator_lr=3e-5,1e-4 --fixed warmup.steps=600   # the DI student (paper/dvc.yaml)

Each setting edits params.yaml, runs `jdm <stage>` and puts params.yaml back (also when a run fails);
the stage's own outputs are left as the last run wrote them, so `dvc status` shows the stage changed
until `dvc repro` runs it again under the committed params. The settings read only the validation maps
(the last jdm.eval_samples of the held-out split), never the table's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

# stage name -> the `jdm` command, its metrics file and its validation curve
STAGES = {"warmup": (["warmup"], "metrics/warmup.json", "metrics/curves/warmup.json"),
          "di": (["baseline", "di"], "metrics/baselines/di.json", "metrics/curves/baselines/di.json"),
          **{f"extend-{c}": (["extend", c], f"metrics/extend-{c}.json", f"metrics/curves/extend-{c}.json")
             for c in ("hed", "depth", "sr")}}


def _value(text: str):
    value = yaml.safe_load(text)  # 0.3 -> float, true -> bool, null -> None, as params.yaml reads them
    if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string; a number was meant
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _assign(params: dict, key: str, value) -> None:
    *path, last = key.split(".")
    section = params
    for part in path:
        section = section[part]
    if last not in section:
        raise SystemExit(f"sweep: {key!r} is not a key of params.yaml")
    section[last] = value


def _label(settings: dict) -> str:
    """'condition_weight=0.3,real_guidance_scale=3': the keys' last parts, sorted; numbers as %g."""
    show = lambda v: f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)  # noqa: E731
    return ",".join(f"{k.split('.')[-1]}={show(v)}" for k, v in sorted(settings.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--grid", required=True, help="KEY=V1,V2,...: the values swept")
    parser.add_argument("--fixed", action="append", default=[], help="KEY=V, the same for every run")
    args = parser.parse_args(argv)
    key, values = args.grid.split("=", 1)
    fixed = dict(item.split("=", 1) for item in args.fixed)
    command, *files = STAGES[args.stage]
    metrics_file, curve_file = (Path(p) for p in files)
    out = Path("metrics/sweeps") / args.stage
    original = Path("params.yaml").read_text()
    table = out.parent / f"{args.stage}.json"
    try:
        for text in values.split(","):
            params = yaml.safe_load(original)
            settings = {**{k: _value(v) for k, v in fixed.items()}, key: _value(text)}
            for k, v in settings.items():
                _assign(params, k, v)
            Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            label = _label(settings)
            start = time.perf_counter()
            subprocess.run(["jdm", *command], check=True)
            (out / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(metrics_file, out / label / "metrics.json")
            shutil.copy(curve_file, out / label / "curve.json")
            final = json.loads(metrics_file.read_text())
            row = {**settings, "label": label, "wall_seconds": round(time.perf_counter() - start, 1),
                   **{k: v for k, v in final.items() if isinstance(v, (int, float))}}
            print(f"sweep {label}: {json.dumps(row)}", flush=True)
            # the table after every setting: a later setting that fails loses nothing finished before it
            kept = json.loads(table.read_text()) if table.is_file() else []
            table.write_text(json.dumps(_table(kept, [row], yaml.safe_load(original)), indent=2, sort_keys=True) + "\n")
    finally:
        Path("params.yaml").write_text(original)
    return 0


def _table(kept: list[dict], rows: list[dict], params: dict) -> list[dict]:
    """One row per setting, sorted by label: a rerun of a setting replaces its row, other sweeps' rows stay.

    Every row gets every column, because `dvc plots show` plots a list of rows only when their keys are the
    same: a params key another sweep set is filled in this sweep's rows with the value params.yaml gave it,
    and a column a kept row never recorded is null (its run's value is not known here)."""
    labels = {row["label"] for row in rows}
    kept = [r for r in kept if r["label"] not in labels]
    columns = {key for row in kept + rows for key in row}
    rows = [{**{key: _param(params, key) for key in columns}, **row} for row in rows]
    return sorted(({**dict.fromkeys(columns), **row} for row in kept + rows), key=lambda r: r["label"])


def _param(params: dict, key: str):
    """params.yaml's value of a dotted key such as jdm.condition_weight; None for other columns."""
    value = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


if __name__ == "__main__":
    sys.exit(main())
