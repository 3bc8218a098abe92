"""infra/sweep.py's bookkeeping: labels, the params it may set, and params.yaml put back after a failed run."""

import json
import subprocess
import sys

import pytest
import yaml

from ..conftest import REPO

sys.path.insert(0, str(REPO / "infra"))
import sweep  # noqa: E402


def test_label_sorts_keys_and_prints_numbers_short():
    assert sweep._label({"jdm.real_guidance_scale": 3.0, "jdm.condition_weight": 0.3}) == \
        "condition_weight=0.3,real_guidance_scale=3"


def test_values_read_as_params_yaml_would_and_exponents_as_numbers():
    assert [sweep._value(v) for v in ("0.3", "3e-5", "1.0e-4", "true", "null", "canny")] == \
        [0.3, 3e-5, 1e-4, True, None, "canny"]


def test_unknown_key_is_refused():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(SystemExit, match="'jdm.condition_wieght' is not a key of params.yaml"):
        sweep._assign(params, "jdm.condition_wieght", 0.3)


def test_params_yaml_is_put_back_and_finished_rows_kept_when_a_run_fails(tmp_path):
    original = "profile: tiny\njdm:\n  condition_weight: 1.0  # a comment that yaml.safe_dump would drop\n"
    (tmp_path / "params.yaml").write_text(original)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # the stage succeeds at weight 0.1 (writing its files) and fails at 0.3
    (bin_dir / "jdm").write_text(
        "#!/bin/sh\ngrep -q 'condition_weight: 0.3' params.yaml && exit 3\nmkdir -p metrics/curves\n"
        "echo '{\"fid_classifier\": 2.0}' > metrics/warmup.json\necho '[]' > metrics/curves/warmup.json\n")
    (bin_dir / "jdm").chmod(0o755)
    result = subprocess.run([sys.executable, str(REPO / "infra" / "sweep.py"), "warmup", "--grid",
                             "jdm.condition_weight=0.1,0.3"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert result.returncode != 0 and "CalledProcessError" in result.stderr
    assert (tmp_path / "params.yaml").read_text() == original
    rows = json.loads((tmp_path / "metrics/sweeps/warmup.json").read_text())
    assert [(r["label"], r["fid_classifier"]) for r in rows] == [("condition_weight=0.1", 2.0)]


def test_rows_of_different_sweeps_share_their_columns_so_dvc_plots_draws_them(tmp_path):
    (tmp_path / "params.yaml").write_text("jdm:\n  condition_weight: 1.0\n  ema_decay: 0.0\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # a stand-in `jdm warmup`: writes the metrics and curve files the stage writes, FID from the weight
    (bin_dir / "jdm").write_text(
        "#!/bin/sh\nmkdir -p metrics/curves\n"
        "w=$(sed -n 's/ *condition_weight: //p' params.yaml)\n"
        "echo \"{\\\"fid_classifier\\\": $w, \\\"consistency\\\": 0.3}\" > metrics/warmup.json\n"
        "echo '[{\"step\": 1, \"eval_fid_classifier\": 2.0}]' > metrics/curves/warmup.json\n")
    (bin_dir / "jdm").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    for args in (["--grid", "jdm.condition_weight=0.1,0.3"],
                 ["--grid", "jdm.ema_decay=0.99", "--fixed", "jdm.condition_weight=0.3"],
                 ["--grid", "jdm.condition_weight=0.3"]):  # a rerun of a setting replaces its row
        subprocess.run([sys.executable, str(REPO / "infra" / "sweep.py"), "warmup", *args], cwd=tmp_path,
                       check=True, capture_output=True, env=env)
    rows = json.loads((tmp_path / "metrics/sweeps/warmup.json").read_text())
    assert [r["label"] for r in rows] == ["condition_weight=0.1", "condition_weight=0.3",
                                          "condition_weight=0.3,ema_decay=0.99"]
    assert all(set(r) == set(rows[0]) for r in rows)
    # the weight-0.1 row ran before any sweep set ema_decay: not known; the rerun of 0.3 used params.yaml's
    assert [r["jdm.ema_decay"] for r in rows] == [None, 0.0, 0.99]
    assert [r["fid_classifier"] for r in rows] == [0.1, 0.3, 0.3]
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json", "metrics/sweeps/warmup.json",
                            "-x", "fid_classifier", "-y", "consistency"], cwd=tmp_path, capture_output=True,
                           text=True, check=True)
    plots = json.loads(shown.stdout)
    assert "errors" not in plots, plots["errors"]
    points = plots["data"]["metrics/sweeps/warmup.json"][0]["content"]["data"]["values"]
    assert sorted(p["fid_classifier"] for p in points) == [0.1, 0.3, 0.3]
