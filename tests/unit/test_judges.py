"""Held-out judges of consistency (jdm/judges.py) and the evaluation's column for them."""

import pytest
import torch

from jdm.annotators.depth import DepthNet, save_depth_net
from jdm.conditions import load_condition
from jdm.evaluation import FeatureSpace, score
from jdm.judges import EdgeJudge, NetworkJudge, judge_path, judged_consistency_per_sample, load_judge
from jdm.metrics import features

from .test_evaluation import PixelFeatures, images


def squares(offset=0, contrast=1.0):
    x = torch.zeros(3, 1, 32, 32)
    x[:, :, 8 + offset:24 + offset, 8:24] = contrast
    return x


def test_edge_judge_finds_edges_whatever_the_contrast():
    judge = EdgeJudge(sigma=1.0)
    maps = judge(squares())
    assert maps.shape == (3, 1, 32, 32) and maps.min() >= 0 and maps.max() == pytest.approx(1.0)
    assert maps[0, 0, 16, 8] > 0.5 > 0.01 > maps[0, 0, 16, 16]  # on the square's edge, not inside it
    assert torch.allclose(judge(squares(contrast=0.4)), maps, atol=1e-5)
    assert torch.allclose(judge(squares().expand(3, 3, 32, 32)), maps)  # RGB: its gray


def test_judged_consistency_is_zero_for_the_real_image_and_grows_with_a_shift():
    judge, real = EdgeJudge(), squares()
    assert judged_consistency_per_sample(judge, real, real).abs().max() == 0
    one, four = (judged_consistency_per_sample(judge, squares(k), real) for k in (1, 4))
    assert (0 < one).all() and (one < four).all()
    with pytest.raises(ValueError, match="3 samples but 2 real images"):
        judged_consistency_per_sample(judge, real, real[:2])


def test_judges_exist_where_the_extractor_is_trained_against(smoke_params, tmp_path):
    save_depth_net(DepthNet((8, 12)), judge_path(tmp_path, "depth"))
    assert isinstance(load_judge("hed", smoke_params, tmp_path), EdgeJudge)
    depth = load_judge("depth", smoke_params, tmp_path)
    assert isinstance(depth, NetworkJudge) and depth.network.channels == (8, 12)
    assert depth(squares()).shape == (3, 1, 32, 32)
    assert load_judge("canny", smoke_params, tmp_path) is None and load_judge("sr", smoke_params, tmp_path) is None


def test_score_gives_the_judged_consistency_its_interval(smoke_params, tmp_path, monkeypatch):
    monkeypatch.setattr("jdm.evaluation.prompt_hits", lambda classifier, samples, classes: torch.ones(len(samples)))
    sr = load_condition("sr", smoke_params, tmp_path)
    net = PixelFeatures()
    spaces = {"pixels": FeatureSpace(net, features(net, images(40, 0)))}
    real, samples = images(20, 1), images(20, 2)
    out = score(samples, sr.extract(samples), torch.zeros(20), sr, None, spaces, resamples=30, seed=0,
                judge=EdgeJudge(), real=real)
    assert out["consistency_judge_low"] < out["consistency_judge"] < out["consistency_judge_high"]
    assert out["consistency_judge"] == pytest.approx(
        judged_consistency_per_sample(EdgeJudge(), samples, real).mean().item())
    assert "consistency_judge" not in score(samples, sr.extract(samples), torch.zeros(20), sr, None, spaces,
                                            resamples=0, seed=0)
