"""`jdm` under JDM_ACCELERATE_CONFIG: which commands start themselves again through `accelerate launch`."""

import pytest

from jdm.cli import LAUNCH_CONFIG, relaunch
from jdm.errors import UserError


def test_only_a_data_parallel_command_with_the_variable_set_outside_a_launch_relaunches(monkeypatch, tmp_path):
    monkeypatch.delenv(LAUNCH_CONFIG, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert relaunch(["warmup"], "warmup") is None  # no variable: train here
    monkeypatch.setenv(LAUNCH_CONFIG, str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match=r"JDM_ACCELERATE_CONFIG='.*missing.yaml' is not a file: name an accelerate config"):
        relaunch(["extend", "hed"], "extend")
    assert relaunch(["report"], "report") is None  # not a data-parallel command: runs once, here
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert relaunch(["warmup"], "warmup") is None  # already one of the launched processes
