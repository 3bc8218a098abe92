"""A copy of the repository as a clean clone has it (tracked and untracked-but-not-ignored files,
no outputs DVC ignores), in its own git repository: where the end-to-end tests and the pipeline
benchmark run `dvc repro` without touching this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def clean_copy(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        src, out = REPO / rel, dst / rel
        if src.is_symlink():  # as git checks it out (seeds/<k>/data -> ../../data), not what it points to
            out.parent.mkdir(parents=True, exist_ok=True)
            out.symlink_to(os.readlink(src))
        elif src.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst
