"""Real images, their prompts and a fixed held-out split.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (idx gz files), so the embedded default
needs no download. Images are padded from 28 to 32 pixels (and area-resized for 16 px profiles),
kept as uint8 on disk; every prompt is a template filled with the class name.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import load_tensors

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

    @classmethod
    def load(cls, root: str | Path) -> "PreparedData":
        root = Path(root)
        meta_path = root / "prompts.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: run the `data` stage first (`dvc repro data`)")
        meta = json.loads(meta_path.read_text())
        return cls(root, meta["prompts"], meta["prompt_classes"])

    def split(self, name: str) -> Split:
        t = load_tensors(self.root / f"{name}.safetensors")
        return Split(t["images"], t["labels"], t["prompt_ids"])

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-level prompt embeddings [P,L,D] and their attention masks [P,L], indexed by prompt id."""
        t = load_tensors(self.root / "embeddings.safetensors")
        return t["hidden_states"], t["attention_mask"]
