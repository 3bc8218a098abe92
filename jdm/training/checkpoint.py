"""Resumable training: every N steps, all trainable state (weights, optimisers, EMAs, RNGs, step)
goes to one file, written atomically; a rerun after an interruption continues from it.

A checkpoint carries a fingerprint of the settings that produced it (the stage's params): a rerun
with other settings starts afresh instead of resuming into a different experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpointer:
    """`stateful`: name -> object with state_dict()/load_state_dict() (modules, optimisers, EMAModels);
    `generators`: name -> torch.Generator whose state is saved too (data order, noise)."""

    def __init__(self, directory: str | os.PathLike, settings: dict, every: int,
                 stateful: dict[str, Any], generators: dict[str, torch.Generator]):
        self.directory, self.every = Path(directory), every
        self.fingerprint = fingerprint(settings)
        self.stateful, self.generators = stateful, generators
        self.last_step = 0

    @property
    def path(self) -> Path:
        return self.directory / STATE_FILE

    def restore(self) -> int:
        """Load the last checkpoint if it is one of these settings; return its step (0 = fresh start)."""
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            print(f"checkpoint {self.path} is from other settings; starting afresh (it is replaced at the first save)")
            return 0
        for name, obj in self.stateful.items():
            obj.load_state_dict(state["objects"][name])
        for name, gen in self.generators.items():
            gen.set_state(state["generators"][name])
        torch.set_rng_state(state["torch_rng"])
        self.last_step = int(state["step"])
        return self.last_step

    def maybe_save(self, step: int) -> bool:
        if step % self.every:
            return False
        self.save(step)
        return True

    def save(self, step: int) -> None:
        state = {"fingerprint": self.fingerprint, "step": step, "torch_rng": torch.get_rng_state(),
                 "objects": {name: obj.state_dict() for name, obj in self.stateful.items()},
                 "generators": {name: gen.get_state() for name, gen in self.generators.items()}}
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous checkpoint whole
        self.last_step = step


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """After the stage's outputs are saved the checkpoint has served its purpose."""
    shutil.rmtree(directory, ignore_errors=True)
