"""Real images, their prompts and a fixed held-out split, from one of two sources.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (idx gz files), so the embedded default
needs no download. Images are padded from 28 to 32 pixels (and area-resized for 16 px profiles),
kept as uint8 on disk; every prompt is a template filled with the class name.

An image folder is your own captioned images, read by Hugging Face `datasets` in its imagefolder
layout (what diffusers' training examples read): images with a `metadata.jsonl` of `file_name`,
`text` (the caption, the image's prompt) and optionally `label` (its class, for prompt accuracy and the
classifier's FID features); a `test/` subfolder is the held-out split. Images are resized (shorter
side) and centre-cropped to the profile's size, as diffusers' `train_controlnet.py` does. A folder
without labels takes its classes from its captions (`classes_from_captions`).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .io import load_tensors
from .progress import progress

CLASS_NAMES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot")
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
EMPTY_PROMPT_ID = 0  # the unconditional prompt "" for classifier-free guidance


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_fashion_mnist(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N,1,28,28] and int64 labels [N] of one split."""
    root = Path(root)
    files = [root / name for name in IDX_FILES[split]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: missing {', '.join(missing)}. Install Debian's package "
            f"(`apt-get install dataset-fashion-mnist`) or set data.root to a folder holding "
            f"{', '.join(n for n in IDX_FILES[split])}")
    images, labels = (_read_idx(f) for f in files)
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pad 28 px Fashion-MNIST to 32 px (the garment stays whole), then resize to `size`."""
    x = F.pad(images.float(), (2, 2, 2, 2))
    if size < 32:
        x = F.interpolate(x, size=(size, size), mode="area")
    elif size > 32:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def build_prompts(templates: list[str]) -> tuple[list[str], list[int]]:
    """All prompts (id 0 is the empty prompt) and the class of each (-1 for the empty prompt)."""
    prompts, classes = [""], [-1]
    for c, name in enumerate(CLASS_NAMES):
        for t in templates:
            prompts.append(t.format(name))
            classes.append(c)
    return prompts, classes


def assign_prompts(labels: torch.Tensor, num_templates: int, generator: torch.Generator) -> torch.Tensor:
    """A prompt id per image: a random template of the image's class."""
    template = torch.randint(num_templates, labels.shape, generator=generator)
    return 1 + labels * num_templates + template


@dataclass
class Source:
    """What a source gives the `data` stage: every prompt (id 0 is the empty prompt), the class of each
    (-1: none), the class names, and per split uint8 images [N,C,S,S], labels [N] (-1: none), prompt ids [N]."""
    prompts: list[str]
    prompt_classes: list[int]
    class_names: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def fashion_mnist(p, g: torch.Generator) -> Source:
    """A random `max_train` of the train split; the test split shuffled once (a prefix is a fair FID
    reference), its first `num_eval` the evaluation split; a random template of its class per image."""
    prompts, classes = build_prompts(p.templates)
    images, labels = read_fashion_mnist(p.root, "train")
    keep = torch.randperm(len(labels), generator=g)[:p.max_train]
    raw = {"train": (images[keep], labels[keep])}
    images, labels = read_fashion_mnist(p.root, "test")
    order = torch.randperm(len(labels), generator=g)
    raw["test"] = (images[order], labels[order])
    raw["eval"] = (images[order[:p.num_eval]], labels[order[:p.num_eval]])
    splits = {name: (resize_images(x, p.image_size), y, assign_prompts(y, len(p.templates), g))
              for name, (x, y) in raw.items()}
    return Source(prompts, classes, list(CLASS_NAMES), splits)


def scoring_prompts(prepared: "PreparedData", p, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` prompt ids and their classes for scoring samples of prompts alone (the teacher, text-to-image):
    Fashion-MNIST's classes in turn, each with a template drawn from `g`; a folder's held-out captions in turn."""
    if p.source == "fashion-mnist":
        classes = torch.arange(n) % len(prepared.class_names)
        return assign_prompts(classes, len(p.templates), g), classes
    captions = prepared.split("test").prompt_ids
    prompt_ids = captions[torch.arange(n) % len(captions)]
    return prompt_ids, torch.tensor(prepared.prompt_classes)[prompt_ids]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_folder(p, g: torch.Generator) -> Source:
    """Your captioned images (`data.root`: a folder, or a `datasets` name in the local cache). The held-out
    split is the dataset's `test` split, else `num_eval` random images; training takes at most `max_train`."""
    splits = _load_image_dataset(p)
    label_names = _label_names(list(splits.values()), p.label_column)
    train = splits["train"]
    if "test" in splits:
        test = splits["test"]
        if len(test) < p.num_eval:
            raise UserError(f"data.root {p.root}: the test split has {len(test)} images, fewer than data.num_eval "
                            f"({p.num_eval}): add images or lower data.num_eval")
        test_rows = torch.randperm(len(test), generator=g).tolist()
    else:
        test = train
        order = torch.randperm(len(train), generator=g).tolist()
        if len(order) <= p.num_eval:
            raise UserError(f"data.root {p.root}: {len(order)} images, but data.num_eval ({p.num_eval}) are held out "
                            "and training needs the rest: add images, lower data.num_eval, or give a test/ split")
        test_rows, train = order[:p.num_eval], train.select(order[p.num_eval:])
    train_rows = torch.randperm(len(train), generator=g)[:p.max_train].tolist()
    prompts, prompt_classes, prompt_id, out = [""], [-1], {"": EMPTY_PROMPT_ID}, {}
    for name, ds, rows in (("train", train, train_rows), ("test", test, test_rows)):
        images = torch.empty((len(rows), p.channels, p.image_size, p.image_size), dtype=torch.uint8)
        labels, prompt_ids = torch.full((len(rows),), -1), torch.empty(len(rows), dtype=torch.int64)
        for i, row in enumerate(progress(rows, f"reading {name} images")):
            record = ds[row]
            where = _where(record[p.image_column], name, row)
            caption = record.get(p.caption_column)
            if not isinstance(caption, str) or not caption.strip():
                raise UserError(f"{where}: no caption ({p.caption_column!r} is {caption!r} in metadata.jsonl)")
            images[i] = _read_image(record[p.image_column], where, p.image_size, p.channels)
            if label_names:
                labels[i] = _label(record.get(p.label_column), label_names, where, p.label_column)
            if caption not in prompt_id:  # a caption's class: that of its first image
                prompt_id[caption] = len(prompts)
                prompts.append(caption)
                prompt_classes.append(int(labels[i]))
            prompt_ids[i] = prompt_id[caption]
        out[name] = (images, labels, prompt_ids)
    out["eval"] = tuple(t[:p.num_eval] for t in out["test"])
    return Source(prompts, prompt_classes, label_names, out)


def classes_from_captions(source: Source, hidden: torch.Tensor, mask: torch.Tensor, num_classes: int,
                          seed: int) -> Source:
    """A source without labels, given classes by its captions: k-means (`num_classes` clusters, at most one
    per distinct caption) on each caption's mean token embedding [P,L,D] under `mask` [P,L], so that prompt
    accuracy asks "does the sample show what captions like its prompt show?" and the classifier that scores
    it has a target. A class is named by its caption nearest the cluster's centre; the empty prompt has none."""
    from sklearn.cluster import KMeans

    weights = mask[1:, :, None].to(hidden.dtype)  # id 0 is the empty prompt
    pooled = F.normalize((hidden[1:] * weights).sum(1) / weights.sum(1).clamp(min=1), dim=1).double().numpy()
    k = min(num_classes, len(pooled))
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(pooled)
    names = [source.prompts[1 + i] for i in kmeans.transform(pooled).argmin(0).tolist()]
    prompt_classes = [-1, *kmeans.labels_.tolist()]
    lookup = torch.tensor(prompt_classes)
    splits = {name: (images, lookup[prompt_ids], prompt_ids) for name, (images, _, prompt_ids) in source.splits.items()}
    return Source(source.prompts, prompt_classes, names, splits)


def _load_image_dataset(p) -> dict:
    """Split name -> `datasets.Dataset` with undecoded images (each image is read, and named if bad, here)."""
    import sys

    import datasets

    if not sys.stderr.isatty():  # as jdm/progress.py: no bars in a log
        datasets.disable_progress_bars()
    root = Path(p.root).expanduser()
    try:
        if root.is_dir():
            files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"data.root {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or below")
            if not any(root.rglob("metadata.jsonl")):
                raise UserError(f"data.root {root}: no metadata.jsonl, the captions: one JSON line per image with "
                                f"file_name and {p.caption_column} (and optionally {p.label_column})")
            loaded = datasets.load_dataset("imagefolder", data_dir=str(root))
        else:
            loaded = datasets.load_dataset(p.root)  # a dataset name: from the local cache (offline)
    except UserError:
        raise
    except Exception as err:  # datasets' own message says what is wrong with the folder or name
        raise UserError(f"data.root {p.root!r} could not be read as a captioned image dataset: {err}") from None
    splits = {name: ds for name, ds in loaded.items() if name in ("train", "test")}
    if "train" not in splits:
        raise UserError(f"data.root {p.root!r} has no train split (splits: {', '.join(loaded) or 'none'})")
    for name, ds in splits.items():
        missing = [c for c in (p.image_column, p.caption_column) if c not in ds.column_names]
        if missing:
            raise UserError(f"data.root {p.root!r}, split {name}: no column {', '.join(map(repr, missing))} (columns: "
                            f"{', '.join(ds.column_names)}); set data.image_column / data.caption_column")
        splits[name] = ds.cast_column(p.image_column, datasets.Image(decode=False))
    if root.is_dir():  # imagefolder drops an image that metadata.jsonl does not list: a missing caption
        listed = {Path(r["path"]).resolve() for ds in splits.values() for r in ds[p.image_column]}
        unlisted = [str(f) for f in files if f.resolve() not in listed]
        if unlisted:
            raise UserError(f"{', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}: no caption (not in "
                            f"metadata.jsonl; {len(unlisted)} image(s) unlisted)")
    return splits


def _where(image: dict, split: str, row: int) -> str:
    return image.get("path") or f"row {row} of the {split} split"


def _read_image(image: dict, where: str, size: int, channels: int) -> torch.Tensor:
    """uint8 [C,size,size]: the shorter side resized to `size`, then the centre cropped."""
    import io

    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as img:
            img = img.convert("RGB" if channels == 3 else "L")
    except Exception as err:
        raise UserError(f"{where} is not a readable image ({err})") from None
    img = TF.center_crop(TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR), size)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def _label_names(splits: list, column: str) -> list[str]:
    """The class names: a ClassLabel's own, else the column's distinct values sorted; [] without labels."""
    if any(column not in ds.column_names for ds in splits):
        return []
    feature = splits[0].features[column]
    if hasattr(feature, "names"):
        return list(feature.names)
    return sorted({str(v) for ds in splits for v in ds[column] if v is not None})


def _label(value, names: list[str], where: str, column: str) -> int:
    if isinstance(value, int) and 0 <= value < len(names):  # a ClassLabel's index
        return value
    if value is None or str(value) not in names:
        raise UserError(f"{where}: no label ({column!r} is {value!r} in metadata.jsonl); the others' classes: "
                        f"{', '.join(names)}")
    return names.index(str(value))


@dataclass
class Split:
    images: torch.Tensor      # uint8 [N,C,H,W]
    labels: torch.Tensor      # int64 [N]
    prompt_ids: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, idx: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """Images in [0,1] (what conditions and metrics see)."""
        return self.images[idx].float() / 255.0


@dataclass
class PreparedData:
    root: Path
    prompts: list[str]
    prompt_classes: list[int]
    class_names: list[str]  # [] when the images have no labels

    @classmethod
    def load(cls, root: str | Path) -> "PreparedData":
        root = Path(root)
        meta_path = root / "prompts.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: run the `data` stage first (`dvc repro data`)")
        meta = json.loads(meta_path.read_text())
        return cls(root, meta["prompts"], meta["prompt_classes"], meta["class_names"])

    def split(self, name: str) -> Split:
        t = load_tensors(self.root / f"{name}.safetensors")
        return Split(t["images"], t["labels"], t["prompt_ids"])

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-level prompt embeddings [P,L,D] and their attention masks [P,L], indexed by prompt id."""
        t = load_tensors(self.root / "embeddings.safetensors")
        return t["hidden_states"], t["attention_mask"]
