"""infra/fid_gap.py's pixel statistics, on images whose answer is known, and its refusal of a bad blur."""

import sys

import pytest
import torch

from ..conftest import REPO

sys.path.insert(0, str(REPO / "infra"))
import fid_gap  # noqa: E402


def test_pixel_statistics_of_flat_and_speckled_images():
    flat = torch.full((2, 1, 8, 8), 0.5)
    stats = fid_gap.pixel_statistics(flat)
    assert stats["total_variation"] == 0 and stats["near_black"] == stats["near_white"] == 0 and stats["mean"] == 0.5
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2).float().expand(2, 1, 8, 8)
    stats = fid_gap.pixel_statistics(checker)  # every neighbour differs by 1: the most speckle there is
    assert stats["total_variation"] == 1 and stats["near_black"] == stats["near_white"] == 0.5


def test_blur_keeps_the_mean_and_takes_the_speckle():
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(1, 1, 16, 16)
    smooth = fid_gap.blurred(checker, 1.0)
    assert fid_gap.pixel_statistics(smooth)["total_variation"] < 0.1
    assert abs(float(smooth.mean()) - 0.5) < 0.01


def test_a_blur_of_zero_pixels_is_refused():
    with pytest.raises(SystemExit, match="--sigma 0.0: the blur must be above 0 pixels"):
        fid_gap.main(["canny", "--sigma", "0"])


def test_fid_splits_into_a_mean_term_and_a_covariance_term():
    import numpy as np

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((4000, 3))
    reference -= reference.mean(0)
    shifted = reference + np.array([3.0, 0.0, 0.0])  # the same spread, means 3 apart: all mean term
    terms = fid_gap.feature_terms(shifted, reference)
    assert terms["fid_mean_term"] == pytest.approx(9.0) and abs(terms["fid_covariance_term"]) < 1e-6
    narrow = 0.5 * reference  # the same mean, half the spread: a quarter of the trace; FID = tr(S + S/4 - 2 S/2) = tr(S)/4
    terms = fid_gap.feature_terms(narrow, reference)
    assert terms["fid_mean_term"] < 1e-12
    assert terms["feature_spread"] == pytest.approx(fid_gap.feature_spread(reference) / 4)
    assert terms["fid_covariance_term"] == pytest.approx(0.25 * np.trace(np.cov(reference, rowvar=False)), rel=1e-6)
