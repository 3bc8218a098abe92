"""infra/inception_curve.py refuses settings it cannot apply, naming them, before it trains anything."""

import re
import sys

import pytest

from ..conftest import REPO

sys.path.insert(0, str(REPO / "infra"))
import inception_curve  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--set", "fake_steps=5"], "--set 'fake_steps=5': expected jdm.KEY=VALUE"),
    (["--set", "jdm.fake_stepz=5"], "--set jdm.fake_stepz: not a key of the `jdm` section"),
    (["--every", "0"], "--steps None --every 0: both must be at least 1"),
])
def test_bad_settings_are_refused(argv, message, monkeypatch):
    monkeypatch.chdir(REPO)  # the committed params.yaml, whose `jdm` keys the check reads
    with pytest.raises(SystemExit, match=re.escape(message)):
        inception_curve.main(argv)
