"""Annotators: turn images into condition maps (edges, depth), and the classifier that scores samples."""

from __future__ import annotations

import re
from pathlib import Path

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
