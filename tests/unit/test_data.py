import pytest
import torch

from jdm import data

from ..conftest import write_image_folder


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


def folder_params(root, **kw):
    from jdm.config import DataParams
    return DataParams(**{"source": "imagefolder", "root": str(root), "image_size": 16, "num_eval": 4,
                         "templates": ["a {}"], **kw})


def test_an_image_folder_is_resized_cropped_captioned_and_split(tmp_path):
    g = torch.Generator().manual_seed(0)
    source = data.image_folder(folder_params(write_image_folder(tmp_path / "f")), g)
    train, test, held = (source.splits[k] for k in ("train", "test", "eval"))
    assert train[0].shape == (8, 3, 16, 16) and test[0].shape == held[0].shape == (4, 3, 16, 16)
    assert train[0].dtype == torch.uint8 and torch.equal(test[0], held[0])
    assert source.class_names == ["cat", "dog"] and source.prompts[0] == ""
    for images, labels, prompt_ids in (train, test):
        for x, label, pid in zip(images, labels.tolist(), prompt_ids.tolist()):
            kind = source.class_names[label]
            assert source.prompts[pid].startswith(f"a {kind}") and source.prompt_classes[pid] == label
            assert x[0 if kind == "cat" else 2].max() > 150 > x[2 if kind == "cat" else 0].max()  # the colour survived
    assert len(set(source.prompts)) == len(source.prompts) == 5  # "" and four distinct captions
    # the same seed splits the same way; gray folders give one channel
    again = data.image_folder(folder_params(tmp_path / "f"), torch.Generator().manual_seed(0))
    assert torch.equal(again.splits["train"][0], train[0])
    assert data.image_folder(folder_params(tmp_path / "f", color="gray"), g).splits["eval"][0].shape[1] == 1
    # a test/ subfolder is the held-out split
    split = data.image_folder(folder_params(write_image_folder(tmp_path / "s", n=14, held_out=4)), g)
    assert len(split.splits["train"][1]) == 10 and len(split.splits["test"][1]) == 4


def test_a_folder_without_labels_takes_its_classes_from_its_captions(tmp_path):
    from jdm.config import TextEncoderParams
    from jdm.text import TextEncoder

    source = data.image_folder(folder_params(write_image_folder(tmp_path / "f", n=16, labels=False)),
                               torch.Generator().manual_seed(0))
    assert source.class_names == [] and set(source.splits["train"][1].tolist()) == {-1}
    hidden, mask = TextEncoder.from_params(TextEncoderParams()).encode(source.prompts)
    two = data.classes_from_captions(source, hidden, mask, num_classes=2, seed=0)
    # MiniLM puts "a cat, number 2" nearer "a cat, number 0" than any dog: the clusters are the animals
    cat, dog = (two.class_names.index(n) for n in sorted(two.class_names))
    assert sorted(two.class_names)[0].startswith("a cat") and sorted(two.class_names)[1].startswith("a dog")
    assert two.prompt_classes[0] == -1  # the empty prompt names no class
    for prompt, c in zip(two.prompts[1:], two.prompt_classes[1:]):
        assert c == (cat if prompt.startswith("a cat") else dog), (prompt, c)
    for images, labels, prompt_ids in two.splits.values():
        assert torch.equal(labels, torch.tensor(two.prompt_classes)[prompt_ids])
    assert torch.equal(two.splits["eval"][0], source.splits["eval"][0])  # images and prompts untouched
    # at most one class per distinct caption; the same seed clusters the same way
    many = data.classes_from_captions(source, hidden, mask, num_classes=20, seed=0)
    assert sorted(many.class_names) == sorted(source.prompts[1:]) and len(set(many.prompt_classes[1:])) == 4
    again = data.classes_from_captions(source, hidden, mask, num_classes=2, seed=0)
    assert (again.class_names, again.prompt_classes) == (two.class_names, two.prompt_classes)


def test_prompts_for_scoring_are_the_classes_in_turn_or_the_held_out_captions(tmp_path):
    from types import SimpleNamespace

    from jdm.io import save_tensors

    fashion = SimpleNamespace(source="fashion-mnist", templates=["a {}", "the {}"])
    prepared = SimpleNamespace(class_names=list(data.CLASS_NAMES))
    prompt_ids, classes = data.scoring_prompts(prepared, fashion, 25, torch.Generator().manual_seed(0))
    assert classes.tolist() == [i % 10 for i in range(25)]
    assert torch.equal(prompt_ids, data.assign_prompts(classes, 2, torch.Generator().manual_seed(0)))
    # a folder: its held-out captions in turn, each with its caption's class
    save_tensors({"images": torch.zeros(3, 1, 8, 8, dtype=torch.uint8), "labels": torch.tensor([1, 0, 1]),
                  "prompt_ids": torch.tensor([3, 1, 2])}, tmp_path / "test.safetensors")
    folder = data.PreparedData(tmp_path, ["", "a", "b", "c"], [-1, 0, 1, 1], ["a", "b"])
    prompt_ids, classes = data.scoring_prompts(folder, SimpleNamespace(source="imagefolder"), 5, torch.Generator())
    assert prompt_ids.tolist() == [3, 1, 2, 3, 1] and classes.tolist() == [1, 0, 1, 1, 0]


def test_bad_image_folders_are_refused_naming_the_file(tmp_path):
    from jdm.errors import UserError

    g = torch.Generator()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        data.image_folder(folder_params(tmp_path / "empty"), g)
    root = write_image_folder(tmp_path / "f")
    (root / "metadata.jsonl").rename(root / "captions.jsonl")
    with pytest.raises(UserError, match="no metadata.jsonl"):
        data.image_folder(folder_params(root), g)
    (root / "captions.jsonl").rename(root / "metadata.jsonl")
    (root / "stray.png").write_bytes((root / "im1.png").read_bytes())
    with pytest.raises(UserError, match=r"stray.png: no caption \(not in metadata.jsonl"):
        data.image_folder(folder_params(root), g)
    (root / "stray.png").unlink()
    lines = (root / "metadata.jsonl").read_text().splitlines()
    (root / "metadata.jsonl").write_text("\n".join([lines[0].replace('"a cat, number 0"', '""')] + lines[1:]))
    with pytest.raises(UserError, match=r"im0.jpg: no caption \('text' is ''"):
        data.image_folder(folder_params(root, num_eval=11), g)  # every image read: the bad one among them
    (root / "metadata.jsonl").write_text("\n".join(lines))
    (root / "im2.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="im2.png is not a readable image"):
        data.image_folder(folder_params(root, num_eval=11), g)
    with pytest.raises(UserError, match=r"12 images, but data.num_eval \(12\) are held out"):
        data.image_folder(folder_params(root, num_eval=12), g)
    with pytest.raises(UserError, match="no column 'caption'"):
        data.image_folder(folder_params(root, caption_column="caption"), g)
    with pytest.raises(UserError, match="could not be read as a captioned image dataset"):
        data.image_folder(folder_params(tmp_path / "no-such-folder"), g)
    with pytest.raises(ValueError, match="data.color 'rgb' needs data.source 'imagefolder'"):
        from jdm.config import DataParams
        DataParams(color="rgb", templates=["a {}"])
