"""infra/sweep.py's bookkeeping: labels, the params it may set, and params.yaml put back after a failed run."""

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


def test_params_yaml_is_put_back_when_a_run_fails(tmp_path):
    original = "profile: tiny\njdm:\n  condition_weight: 1.0  # a comment that yaml.safe_dump would drop\n"
    (tmp_path / "params.yaml").write_text(original)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "jdm").write_text("#!/bin/sh\nexit 3\n")  # the stage fails
    (bin_dir / "jdm").chmod(0o755)
    result = subprocess.run([sys.executable, str(REPO / "infra" / "sweep.py"), "warmup", "--grid",
                             "jdm.condition_weight=0.1,0.3"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert result.returncode != 0 and "CalledProcessError" in result.stderr
    assert (tmp_path / "params.yaml").read_text() == original
    assert not (tmp_path / "metrics").exists()
