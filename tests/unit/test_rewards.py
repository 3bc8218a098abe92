"""The reward stand-in: Bradley-Terry on (real, degraded real) pairs learns to prefer real images."""

import math

import pytest
import torch

from jdm.data import read_fashion_mnist, resize_images
from jdm.rewards import DEGRADATIONS, bradley_terry_loss, degrade, load_reward, preference_accuracy, save_reward, train_reward


def test_bradley_terry_loss_is_the_preference_likelihood():
    r_w, r_l = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = [math.log1p(math.exp(-2.0)), math.log(2.0), math.log1p(math.exp(2.0))]
    assert bradley_terry_loss(r_w, r_l).item() == pytest.approx(sum(expected) / 3, rel=1e-6)


def test_every_degradation_changes_an_image_and_stays_in_range():
    x = torch.rand(len(DEGRADATIONS) * 4, 1, 16, 16)
    kinds = torch.arange(len(DEGRADATIONS)).repeat(4)
    y = degrade(x, torch.Generator().manual_seed(0), kinds)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert ((y - x).abs().amax(dim=(1, 2, 3)) > 1e-3).all()


def test_reward_prefers_real_images_on_held_out_pairs(tmp_path):
    images, _ = read_fashion_mnist("/usr/share/datasets/fashion-mnist", "train")
    images = resize_images(images[:1536], 16)
    model = train_reward(images[:1024], steps=150, batch_size=32, lr=3e-3, seed=0, width=8)
    scores = preference_accuracy(model, images[1024:], seed=1)
    assert scores["preference_accuracy"] > 0.9, scores
    assert all(scores[f"preference_accuracy_{name}"] > 0.75 for name in DEGRADATIONS), scores
    save_reward(model, tmp_path, scores)
    again = load_reward(tmp_path)
    x = images[1024:1040].float() / 255
    assert torch.equal(model(x), again(x))
    x.requires_grad_(True)
    again(x, ["a photo of a shirt"] * 16).sum().backward()  # differentiable in the image: HFL's gradient
    assert x.grad is not None and x.grad.abs().sum() > 0
