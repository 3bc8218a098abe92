"""infra/repro.py on a DVC project of four small stages (a -> b, c -> d): independent stages run side by
side, a stage waits for what it depends on, up-to-date stages are not started, a failure stops only
what depends on it, `--pull` restores from a remote what it holds instead of running it."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ..conftest import REPO

sys.path.insert(0, str(REPO / "infra"))
import repro  # noqa: E402

# each stage writes its output after `sleep` seconds and records when it ran in stamps/<name>.json
STAGE = textwrap.dedent("""\
    import json, sys, time
    from pathlib import Path
    name, sleep, fail = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "fail"
    start = time.time()
    time.sleep(sleep)
    Path("stamps").mkdir(exist_ok=True)
    Path("stamps", name + ".json").write_text(json.dumps({"start": start, "end": time.time()}))
    if fail:
        sys.exit(1)
    Path(name + ".txt").write_text(name)
""")


def write_project(root: Path, fail: str = "") -> None:
    (root / "stage.py").write_text(STAGE)
    deps = {"a": [], "b": ["a.txt"], "c": ["a.txt"], "d": ["b.txt", "c.txt"]}
    stages = {name: {"cmd": f"{sys.executable} stage.py {name} {1.5 if name in 'bc' else 0.1} "
                            f"{'fail' if name == fail else 'ok'}",
                     "deps": ["stage.py", *d], "outs": [f"{name}.txt"]} for name, d in deps.items()}
    (root / "dvc.yaml").write_text(json.dumps({"stages": stages}))


@pytest.fixture
def project(tmp_path, monkeypatch):
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    write_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def stamps(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (root / "stamps").glob("*.json")}


def test_independent_stages_run_side_by_side_after_what_they_depend_on(project):
    assert repro.plan(["dvc.yaml"], project).needs == {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b", "c"}}
    assert repro.main(["--jobs", "2"]) == 0
    t = stamps(project)
    assert t["a"]["end"] <= min(t["b"]["start"], t["c"]["start"])
    assert max(t["b"]["end"], t["c"]["end"]) <= t["d"]["start"]
    assert t["b"]["start"] < t["c"]["end"] and t["c"]["start"] < t["b"]["end"], "b and c did not overlap"
    status = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status"], cwd=project, capture_output=True,
                            text=True, check=True).stdout
    assert "up to date" in status
    # nothing changed: nothing is started; a changed stage reruns with everything downstream of it
    assert repro.plan(["dvc.yaml"], project).order == []
    (project / "c.txt").unlink()
    assert repro.plan(["dvc.yaml"], project).order == ["c", "d"]


def test_one_job_runs_one_stage_at_a_time(project):
    assert repro.main(["--jobs", "1", "d"]) == 0
    t = sorted(stamps(project).values(), key=lambda s: s["start"])
    assert len(t) == 4 and all(x["end"] <= y["start"] for x, y in zip(t, t[1:]))


def test_a_failed_stage_stops_only_what_depends_on_it(project, capsys):
    write_project(project, fail="c")
    assert repro.main(["--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAILED c (exit " in out and "not run: d" in out
    assert "failed to reproduce 'c'" in out  # the end of the stage's own log, quoted
    assert (project / "b.txt").is_file() and not (project / "d.txt").exists()


def test_jobs_below_one_is_refused_naming_the_value(project):
    with pytest.raises(SystemExit, match="--jobs 0"):
        repro.main(["--jobs", "0"])


def test_pull_restores_from_the_remote_instead_of_running(project, tmp_path_factory):
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "remote", "add", "-d", "team", str(tmp_path_factory.mktemp("remote"))], cwd=project, check=True)
    assert repro.main(["--jobs", "2"]) == 0
    subprocess.run([dvc, "push", "--run-cache", "-q"], cwd=project, check=True)
    # a second worker: the lock and the code, no outputs, no cache, nothing run here yet
    for path in [project / ".dvc" / "cache", project / "stamps", *project.glob("?.txt")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert sorted(repro.plan(["dvc.yaml"], project).order) == ["a", "b", "c", "d"]
    assert repro.main(["--jobs", "2", "--pull"]) == 0
    assert not (project / "stamps").exists(), "a stage ran instead of being restored"
    assert {p.name: p.read_text() for p in project.glob("?.txt")} == {f"{n}.txt": n for n in "abcd"}
