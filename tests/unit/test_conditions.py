import pytest
import torch

from jdm.conditions import BUILTIN, load_condition, resolve_condition_class
from jdm.data import read_fashion_mnist, resize_images
from jdm.errors import UserError


def fashion(n=64, size=32):
    images, _ = read_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    return resize_images(images[:n], size).float() / 255


def test_builtins_are_registered():
    assert set(BUILTIN) == {"canny", "hed", "depth", "sr"}


def test_unknown_condition_lists_the_available_ones():
    with pytest.raises(UserError) as err:
        resolve_condition_class("sobel")
    for name in ("'sobel'", "canny", "hed", "depth", "sr", "package.module:ClassName"):
        assert name in str(err.value)


PLUGIN = '''
import torch
from jdm.conditions import Condition

class Brightness(Condition):
    name = "brightness"
    channels = 1
    def extract(self, images):
        return images.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *images.shape[-2:])

class NoInterface:
    pass
'''


def test_plugin_condition_from_an_import_path(plugin_dir):
    (plugin_dir / "user_conditions.py").write_text(PLUGIN)
    cond = load_condition("user_conditions:Brightness")
    x = torch.rand(4, 1, 16, 16, requires_grad=True)
    c = cond.extract(x.detach())
    assert c.shape == (4, 1, 16, 16)
    cond.log_likelihood(x, c).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("path, message", [
    ("user_conditions:NoInterface", "lacks the Condition interface"),
    ("user_conditions:Missing", "has no attribute 'Missing'"),
    ("no_such_module_xyz:Cond", "does not import"),
])
def test_bad_plugins_get_clear_errors(plugin_dir, path, message):
    (plugin_dir / "user_conditions.py").write_text(PLUGIN)
    with pytest.raises(UserError, match=message):
        resolve_condition_class(path)


def test_canny_surrogate_correlates_with_exact_canny():
    cond = load_condition("canny")
    x = fashion()
    exact, soft = cond.extract(x), cond.surrogate(x)
    assert exact.shape == soft.shape == (64, 1, 32, 32)
    assert set(exact.unique().tolist()) <= {0.0, 1.0} and exact.mean() > 0.05
    r = torch.corrcoef(torch.stack([exact.flatten(), soft.flatten()]))[0, 1].item()
    assert r > 0.5, r
    # and a wrong map is less likely than the right one
    ll_right = cond.log_likelihood(x, exact)
    ll_wrong = cond.log_likelihood(x, exact.roll(1, dims=0))
    assert (ll_right > ll_wrong).float().mean() > 0.9


def test_sr_maps_have_the_right_size_and_values():
    cond = load_condition("sr")
    x = fashion(8)
    c = cond.extract(x)
    assert c.shape == x.shape
    blocks = c.unfold(2, 8, 8).unfold(3, 8, 8)  # [N,1,4,4,8,8]: each 8x8 block is constant...
    assert torch.equal(blocks, blocks[..., :1, :1].expand_as(blocks))
    assert torch.equal(blocks[..., 0, 0], x[:, :, ::8, ::8])  # ...and equals a pixel of the image
    xg = x.clone().requires_grad_(True)
    cond.log_likelihood(xg, c + 0.1).sum().backward()
    assert (xg.grad != 0).sum() == 8 * 16  # one pixel per block gets a gradient


def test_control_map_shape_is_checked():
    cond = load_condition("canny")
    with pytest.raises(UserError, match=r"\[N, 1, 32, 32\]"):
        cond.check_map(torch.zeros(2, 3, 32, 32), 32)


@pytest.mark.parametrize("channels, tiles", [(1, 4), (3, 4), (2, 8), (5, 20)])
def test_maps_of_any_channel_count_are_shown_one_gray_row_per_channel(channels, tiles):
    """Gray and RGB stay one tile each; other channel counts (a plugin's) one gray tile per channel."""
    from jdm.tracking import channel_tiles, image_grid

    maps = torch.rand(4, channels, 8, 8)
    shown = channel_tiles(maps)
    assert shown.shape == (tiles, 3, 8, 8)
    if channels not in (1, 3):
        assert torch.equal(shown[4:8, 0], maps[:, 1])  # the second row: every map's second channel
    assert image_grid(maps, nrow=4).shape == (1 + (tiles // 4) * 9, 1 + 4 * 9, 3)


def test_a_plugin_with_no_channels_is_refused(plugin_dir):
    (plugin_dir / "user_conditions.py").write_text(PLUGIN + "\n\nclass Empty(Brightness):\n    channels = 0\n")
    with pytest.raises(UserError, match="has channels = 0; allowed: an int >= 1"):
        resolve_condition_class("user_conditions:Empty")
