"""Annotators: turn images into condition maps (edges, depth), and the classifier that scores samples.

Shared here: `weights_file` (where a loader finds its weights, never downloading) and
`normalize_per_image`, the depth convention of both depth annotators (depth.py, midas.py) and of the
rendered targets (scenes.py): relative inverse depth normalised per image to [0, 1], 1 = nearest.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def weights_file(path_or_hub_id: str, filename: str, hub_filename: str | None = None) -> Path:
    """A weights file: `filename` in a local directory, the file itself, or (for a hub id) the copy
    in the local Hugging Face cache only: nothing is ever downloaded."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        file = path / filename
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist: put {filename} in {path}")
        return file
    if path.is_file():
        return path
    if _HUB_ID.fullmatch(path_or_hub_id):
        from huggingface_hub import hf_hub_download

        hub_filename = hub_filename or filename
        try:
            return Path(hf_hub_download(path_or_hub_id, hub_filename, local_files_only=True))
        except Exception as e:  # not cached (or no such repo): say what was expected where
            raise FileNotFoundError(
                f"{path_or_hub_id}: no local directory of that name, and {hub_filename} of hub repo "
                f"{path_or_hub_id} is not in the local Hugging Face cache (nothing is downloaded): "
                f"pass a directory holding {filename}") from e
    raise FileNotFoundError(f"{path}: no such directory; expected a local directory holding {filename}")


def normalize_per_image(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise each [1, H, W] map of a batch to [0, 1] (a constant map becomes 0)."""
    flat = x.flatten(1)
    lo, hi = flat.min(dim=1).values.view(-1, 1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp_min(eps)
