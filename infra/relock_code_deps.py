"""Record each stage's code deps as they are now, keeping everything else a lock file records.

After a refactor that moves code but not results, every stage's `jdm/` deps change and DVC would
retrain everything. Where the outputs are on this machine, `dvc commit` records the new deps. Where
they are not (a fresh clone: the `tiny` outputs live only in the cache of the machine that built
them), this does what `dvc commit` would do to the deps alone: for every stage of dvc.yaml,
paper/dvc.yaml and seeds/dvc.yaml, the code deps of dvc.yaml are hashed from the working tree, the
data deps keep the hash the lock recorded (found by the path they resolve to), a dep new to dvc.yaml
outside the repository (an input it starts to track, e.g. `data.root`) is hashed now, and params, outputs
and commands stay as recorded. Use it only after a run on `smoke` showed the outputs byte-identical
before and after the change (say so in the commit message); a stage whose data deps changed in
dvc.yaml, or whose command changed, is refused: that is not a move of code.

    python infra/relock_code_deps.py          # rewrite the lock files, listing each stage refreshed
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jdm"


def main() -> int:
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from ruamel.yaml import YAML

    problems, refreshed = [], []
    recorded_locks: dict[Path, dict] = {}  # each lock as it was before this run, parsed once
    to_write: dict[Path, tuple] = {}  # each lock's dvcfile and its stages: one write per lock file
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            lock_path = Path(getattr(stage.dvcfile, "path", "")).with_suffix(".lock")
            if not getattr(stage, "cmd", None) or not lock_path.is_file():
                continue
            if lock_path not in recorded_locks:
                recorded_locks[lock_path] = YAML(typ="safe").load(lock_path.read_text())["stages"]
            entry = recorded_locks[lock_path].get(stage.name)
            if entry is None:
                continue
            if entry["cmd"] != stage.cmd:
                problems.append(f"{stage.addressing}: command changed ({entry['cmd']!r} -> {stage.cmd!r})")
                continue
            wdir = Path(stage.wdir)
            recorded = {(wdir / d["path"]).resolve(): d for d in entry.get("deps", [])}
            files = [d for d in stage.deps if not hasattr(d, "params")]
            now = {Path(d.fs_path).resolve() for d in files}
            # a dep new to dvc.yaml outside the repository (a source folder, e.g. data.root) is an input this
            # change starts to track, not an output of another stage: hashed as it is now, as `dvc commit` would
            new_inputs = [d for d in files if Path(d.fs_path).resolve() not in recorded and not _in_repository(Path(d.fs_path))]
            missing = [d.def_path for d in files if not _is_code(Path(d.fs_path)) and d not in new_inputs
                       and Path(d.fs_path).resolve() not in recorded]
            dropped = [str(p) for p in recorded if not _is_code(p) and p not in now]
            if missing or dropped:
                problems.append(f"{stage.addressing}: data deps changed (new {missing}, dropped {dropped})")
                continue
            for dep in files:
                if _is_code(Path(dep.fs_path)) or dep in new_inputs:
                    dep.save()  # hashed from the working tree, as `dvc commit` would
                else:  # as recorded, also where dvc.yaml now names the same file by another path
                    old = recorded[Path(dep.fs_path).resolve()]
                    dep.hash_info = HashInfo("md5", old["md5"])
                    dep.meta = Meta(size=old.get("size"), nfiles=old.get("nfiles"), isdir=old["md5"].endswith(".dir"))
            to_write.setdefault(lock_path, (stage.dvcfile, []))[1].append(stage)
            refreshed.append(stage.addressing)
        for dvcfile, stages in to_write.values():
            dvcfile.dump_stages(stages, update_pipeline=False)  # a whole lock parsed and written once, not per stage
    print(f"{len(refreshed)} stages refreshed")
    for p in problems:
        print(f"refused: {p}")
    return 1 if problems else 0


def _in_repository(path: Path) -> bool:
    path = path.resolve()
    return path == ROOT or ROOT in path.parents


def _is_code(path: Path) -> bool:
    path = path.resolve()
    return path == PACKAGE or PACKAGE in path.parents


if __name__ == "__main__":
    sys.exit(main())
