import pytest
import torch

from jdm import data


def test_fashion_mnist_reads_and_pads():
    images, labels = data.read_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.min() == 0 and labels.max() == 9
    x32 = data.resize_images(images[:8], 32)
    assert x32.shape == (8, 1, 32, 32)
    assert torch.equal(x32[:, :, 2:30, 2:30], images[:8])  # padding only
    assert x32[:, :, :2].sum() == 0
    assert data.resize_images(images[:8], 16).shape == (8, 1, 16, 16)


def test_missing_dataset_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.read_fashion_mnist(tmp_path, "train")


def test_prompts_cover_every_class_and_the_empty_prompt():
    prompts, classes = data.build_prompts(["a photo of a {}", "an image of a {}"])
    assert prompts[data.EMPTY_PROMPT_ID] == "" and classes[0] == -1
    assert len(prompts) == 21 and prompts[classes.index(7)] == "a photo of a sneaker"
    labels = torch.arange(10).repeat(50)
    pid = data.assign_prompts(labels, 2, torch.Generator().manual_seed(0))
    assert all(classes[p] == label for p, label in zip(pid.tolist(), labels.tolist()))
    assert len(set(pid.tolist())) == 20


def test_long_prompt_is_truncated_with_a_warning():
    from jdm.config import TextEncoderParams
    from jdm.text import TextEncoder

    enc = TextEncoder.from_params(TextEncoderParams(max_length=8))
    with pytest.warns(UserWarning, match="truncated to text_encoder.max_length=8"):
        hidden, mask = enc.encode(["a photo of a sneaker with very many words in its prompt", "a bag ✨ 日本"])
    assert hidden.shape == (2, 8, 384) and mask[0].sum() == 8
    assert torch.isfinite(hidden).all()
