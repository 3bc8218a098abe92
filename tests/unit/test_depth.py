"""Depth annotator: procedural scenes, the MiDaS stand-in, and the controlnet-aux MiDaS loading path."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest
import torch

from jdm.annotators import normalize_per_image
from jdm.annotators.depth import DepthNet, load_depth_net, save_depth_net, train_depth_net
from jdm.annotators.midas import MIDAS_FILE, load_controlnet_aux_midas
from jdm.annotators.scenes import MAX_OBJECTS, draw_scenes, render_scenes, sample_scenes

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    # Measured: on 2 cores shared with other work, 2 intra-op threads made training ~15x slower than 1
    # (OpenMP threads wait on each other while the other core is busy).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------- renders

@pytest.mark.parametrize("size", [16, 32])
def test_render_shapes_range_and_determinism(size):
    images, target = render_scenes(12, size, torch.Generator().manual_seed(0))
    assert images.shape == target.shape == (12, 1, size, size)
    assert images.dtype == target.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.05
    # disparity normalised per image: each map spans exactly [0, 1]
    assert torch.allclose(target.amin(dim=(1, 2, 3)), torch.zeros(12))
    assert torch.allclose(target.amax(dim=(1, 2, 3)), torch.ones(12))
    again = render_scenes(12, size, torch.Generator().manual_seed(0))
    assert torch.equal(images, again[0]) and torch.equal(target, again[1])


def _two_boxes(z_first: float, z_second: float) -> dict[str, torch.Tensor]:
    """One scene, no ground, no fog or noise: two flat unlit rectangles, x in [0.1, 0.6] and [0.4, 0.9]."""
    scene = sample_scenes(1, torch.Generator().manual_seed(0))
    scene.update(horizon=torch.ones(1), z_wall=torch.full((1,), 15.0), wall_albedo=torch.full((1,), 0.1),
                 fog=torch.zeros(1), gain=torch.ones(1), offset=torch.zeros(1), noise=torch.zeros(1))
    k = MAX_OBJECTS
    z = torch.tensor([[z_first, z_second] + [5.0] * (k - 2)])
    scene.update(
        active=torch.tensor([[True, True] + [False] * (k - 2)]),
        z=z, width=0.5 * z, height=0.5 * z,  # both half the image wide and high, whatever their distance
        cx=torch.tensor([[0.35, 0.65] + [0.5] * (k - 2)]), cy=torch.full((1, k), 0.5),
        kind=torch.zeros(1, k), bulge=torch.zeros(1, k), light_x=torch.zeros(1, k), light_y=torch.zeros(1, k),
        stripe_contrast=torch.zeros(1, k), albedo=torch.tensor([[0.9, 0.5] + [0.3] * (k - 2)]),
    )
    return scene


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_object_occludes_farther(near_first):
    # the z-buffer must not depend on the order the objects are listed in
    z_near, z_far = 3.0, 6.0
    scene = _two_boxes(z_near, z_far) if near_first else _two_boxes(z_far, z_near)
    images, z, surface = draw_scenes(scene, 32)
    near_id = 1 if near_first else 2
    near_albedo = 0.9 if near_first else 0.5
    cols = lambda lo, hi: slice(int(lo * 32) + 1, int(hi * 32) - 1)  # noqa: E731  pixels well inside
    rows = slice(10, 22)  # inside both boxes vertically (0.25..0.75 of the image)
    overlap = (0, 0, rows, cols(0.4, 0.6))
    assert torch.all(surface[overlap] == near_id)
    assert torch.allclose(z[overlap], torch.tensor(z_near))
    assert torch.allclose(images[overlap], torch.tensor(near_albedo))  # unlit, unfogged: intensity = albedo
    # each box alone shows its own depth, the rest is the wall
    left, right = (0, 0, rows, cols(0.1, 0.4)), (0, 0, rows, cols(0.6, 0.9))
    assert torch.allclose(z[left], torch.tensor(3.0 if near_first else 6.0))
    assert torch.allclose(z[right], torch.tensor(6.0 if near_first else 3.0))
    assert torch.all(surface[0, 0, :4] == 0) and torch.allclose(z[0, 0, :4], torch.tensor(15.0))
    # as a target: the nearer box is 1, the wall 0, the farther box in between (disparity, not depth)
    target = normalize_per_image(1 / z)
    assert torch.allclose(target[overlap], torch.tensor(1.0))
    assert torch.allclose(target[0, 0, :4], torch.tensor(0.0))
    far = right if near_first else left
    assert torch.allclose(target[far], torch.tensor((1 / 6 - 1 / 15) / (1 / 3 - 1 / 15)))


# ---------------------------------------------------------------------------------------------- network

def test_depth_net_shapes_gray_and_rgb():
    model = DepthNet()
    assert 20_000 < sum(p.numel() for p in model.parameters()) < 300_000
    for size in (16, 32):
        gray = torch.rand(2, 1, size, size)
        out = model(gray)
        assert out.shape == (2, 1, size, size) and out.min() >= 0 and out.max() <= 1
        # three equal channels are the same gray image
        assert torch.allclose(model(gray.expand(-1, 3, -1, -1)), out, atol=1e-6)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 1, 20, 20))


def test_trained_depth_net_orders_near_and_far():
    # 150 steps of batch 32 take ~30 s on one (shared) core
    steps, logged = 150, []
    model, metrics = train_depth_net(steps=steps, batch_size=32, lr=3e-3, size=32, seed=0,
                                     log=lambda step, values: logged.append((step, values)))
    assert [s for s, _ in logged] == list(range(15, 151, 15))
    assert all(torch.isfinite(torch.tensor(v["loss"])) for _, v in logged)
    assert logged[-1][1]["loss"] < 0.5 * logged[0][1]["loss"]
    assert not model.training
    # Measured at these settings: 0.958 / 0.928 / 0.762. Chance is 0.5 for each; the best single cues:
    # "lower in the frame is nearer" 0.91-0.93 on all pairs; brightness 0.86 on near/far objects; on
    # pixel pairs of two different objects brightness 0.64, position 0.55 (visible area is a strong
    # cue there, 0.91, that a short training does not yet exploit: 0.87 after 1000 steps of batch 64).
    assert metrics["ordering_accuracy"] >= 0.94, metrics
    assert metrics["near_far_accuracy"] >= 0.85, metrics
    assert metrics["object_ordering_accuracy"] >= 0.70, metrics


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DepthNet((8, 16, 24, 32)).eval()  # not the default widths: the config must carry them
    save_depth_net(model, tmp_path / "depth")
    assert json.loads((tmp_path / "depth" / "config.json").read_text())["channels"] == [8, 16, 24, 32]
    assert (tmp_path / "depth" / "depth.safetensors").is_file()
    loaded = load_depth_net(tmp_path / "depth")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images, _ = render_scenes(8, 32, torch.Generator().manual_seed(123))
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_load_depth_net_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_depth_net(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- MiDaS

def test_controlnet_aux_midas_missing_dir_and_file(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="dpt_hybrid-midas-501f0c75.pt"):
        load_controlnet_aux_midas(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "dpt_hybrid-midas-501f0c75.pt"))):
        load_controlnet_aux_midas(str(tmp_path))
    # a hub id is only looked up in the local cache, never downloaded
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_controlnet_aux_midas("jdm-tests/no-such-repo")


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.path.join(os.environ["JDM_TEST_PAYLOAD_DIR"], "pwned"),))


def test_controlnet_aux_midas_refuses_pickled_code(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("JDM_TEST_PAYLOAD_DIR", str(tmp_path))
    torch.save({"x": _Payload()}, tmp_path / MIDAS_FILE)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_controlnet_aux_midas(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_controlnet_aux_midas_random_weights(tmp_path, no_network):
    # the real DPT-Hybrid architecture (123M parameters) with random weights, saved as the checkpoint is
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    torch.manual_seed(0)
    reference = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    torch.save(reference.state_dict(), tmp_path / MIDAS_FILE)
    # detect_resolution 64 keeps the CPU forward pass short; the default is MiDaS's 384
    midas = load_controlnet_aux_midas(str(tmp_path), detect_resolution=64)
    assert not midas.training and not any(p.requires_grad for p in midas.parameters())
    name, value = next(iter(reference.state_dict().items()))
    assert torch.equal(midas.model.state_dict()[name], value)

    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = midas(images)
        rgb = midas(images.expand(-1, 3, -1, -1))
    assert out.shape == (2, 1, 32, 32)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out, rgb)
