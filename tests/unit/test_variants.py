"""Which rows the paper's table has: every method on every condition, except the full-range row on the
warm-up's own condition (its JDM row is phase 1's ControlNet)."""

import pytest

from jdm.errors import UserError
from jdm.variants import METHODS, has_row, require_row


def test_only_full_range_lacks_the_warmup_conditions_row():
    missing = [(m, c) for m in METHODS for c in ("canny", "hed", "depth", "sr") if not has_row(m, c, "canny")]
    assert missing == [("full-range", "canny")]
    assert has_row("full-range", "canny", "hed") and not has_row("full-range", "hed", "hed")
    with pytest.raises(UserError, match=r"full-range has no row on 'canny', the warm-up's condition .* any other condition"):
        require_row("full-range", "canny", "canny")
    require_row("full-range", "hed", "canny")  # allowed: no error
