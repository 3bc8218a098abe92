"""Resumable training: every N steps all trainable state (weights, optimisers, LR schedules, EMAs,
RNGs, step) goes to one safetensors file, written atomically; a rerun after an interruption continues
from the newest readable one.

- Format: the state's tensors as safetensors entries, its structure (nested dicts with int keys,
  lists, numbers) as JSON in the file's metadata, with a CRC-32 of every tensor's bytes. Nothing is
  unpickled on resume, so a checkpoint cannot run code, and a damaged one is detected, named and
  skipped for the one before it.
- Bounded: the newest `keep` files are kept (`checkpoint.keep`, at least 1); a failed write (disk
  full) removes its partial file and leaves the previous checkpoints as they were.
- A checkpoint carries a fingerprint of the settings that produced it (the stage's params): a rerun
  with other settings starts afresh instead of resuming into a different experiment.
- Several processes (`accelerate launch`): each keeps its own folder (`process-<i>`: its data RNG
  differs) and they resume from the newest step that all of them have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..io import atomic_file
from .errors import CheckpointWriteFailed, TrainingStopped

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from accelerate import Accelerator

FILE = re.compile(r"step-(\d+)\.safetensors$")
META_KEY = "jdm_checkpoint"


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def records_name(settings_fingerprint: str) -> str:
    """The file beside the checkpoints that keeps a run's logged records (its curves) for a resume."""
    return f"records-{settings_fingerprint}.jsonl"


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def pack(state: Any) -> tuple[dict[str, torch.Tensor], str]:
    """A nested state (dicts, lists, tuples, tensors, numbers, strings) -> (tensors, JSON structure).
    Dict keys keep their type (optimisers key their state by int); a tensor seen twice is stored once."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            ident = (obj.data_ptr(), obj.dtype, tuple(obj.shape), tuple(obj.stride()))
            if ident not in seen:
                seen[ident] = name = f"t{len(tensors)}"
                tensors[name] = obj.detach().cpu().contiguous()
            return {"tensor": seen[ident], "crc": _crc(tensors[seen[ident]])}
        if isinstance(obj, dict):
            return {"dict": [[walk(k), walk(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {"tuple" if isinstance(obj, tuple) else "list": [walk(v) for v in obj]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return {"value": obj}
        if isinstance(obj, torch.dtype):
            return {"dtype": str(obj).removeprefix("torch.")}
        raise TypeError(f"cannot checkpoint a {type(obj).__name__}: {obj!r}")

    return tensors, json.dumps(walk(state))


def unpack(tensors: dict[str, torch.Tensor], structure: str) -> Any:
    def walk(node):
        if "tensor" in node:
            t = tensors[node["tensor"]]
            if _crc(t) != node["crc"]:
                raise ValueError(f"tensor {node['tensor']} fails its CRC check")
            return t
        if "dict" in node:
            return {walk(k): walk(v) for k, v in node["dict"]}
        if "list" in node:
            return [walk(v) for v in node["list"]]
        if "tuple" in node:
            return tuple(walk(v) for v in node["tuple"])
        if "dtype" in node:
            return getattr(torch, node["dtype"])
        return node["value"]

    return walk(json.loads(structure))


def write_state(state: dict, path: Path) -> None:
    tensors, structure = pack(state)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: structure})


def read_state(path: Path) -> dict:
    """The state saved at `path`; ValueError/OSError (named by the caller) when it is damaged."""
    with safe_open(str(path), framework="pt") as f:
        structure = (f.metadata() or {}).get(META_KEY)
        if structure is None:
            raise ValueError("no checkpoint metadata")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unpack(tensors, structure)


class Checkpointer:
    """`stateful`: name -> object with state_dict()/load_state_dict() (modules, optimisers, LR
    schedules, EMAModels); `generators`: name -> torch.Generator whose state is saved too (data order,
    noise). The torch global RNG is saved as well."""

    def __init__(self, directory: str | os.PathLike, settings: dict, every: int, stateful: dict[str, Any],
                 generators: dict[str, torch.Generator], keep: int = 2):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every={every}, keep={keep}: both must be at least 1")
        self.directory, self.every, self.keep = Path(directory), every, keep
        self.fingerprint = fingerprint(settings)
        self.stateful, self.generators = stateful, generators
        self.last_step = 0
        self._stale = False  # files from other settings: replaced at the first save

    def files(self) -> list[tuple[int, Path]]:
        """(step, path), newest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := FILE.match(p.name))]
        return sorted(found, reverse=True)

    def restore(self, at_most: int | None = None) -> int:
        """Load the newest readable checkpoint of these settings (no later than step `at_most`);
        return its step (0 = a fresh start). A damaged file is named and the one before it tried."""
        for step, path in self.files():
            if at_most is not None and step > at_most:
                continue
            try:
                state = read_state(path)
            except Exception as err:  # safetensors' own error type, a bad header, a failed CRC
                log.warning(f"checkpoint {path} is unreadable ({err}); trying the one before")
                continue
            if state.get("fingerprint") != self.fingerprint:
                log.warning(f"checkpoint {path} is from other settings; starting afresh (it is replaced at the first save)")
                self._stale = True
                return 0
            for name, obj in self.stateful.items():
                obj.load_state_dict(state["objects"][name])
            for name, gen in self.generators.items():
                gen.set_state(state["generators"][name])
            torch.set_rng_state(state["torch_rng"])
            self.last_step = int(state["step"])
            return self.last_step
        return 0

    def maybe_save(self, step: int) -> bool:
        if step % self.every:
            return False
        self.save(step)
        return True

    def save(self, step: int) -> None:
        state = {"fingerprint": self.fingerprint, "step": step, "torch_rng": torch.get_rng_state(),
                 "objects": {name: obj.state_dict() for name, obj in self.stateful.items()},
                 "generators": {name: gen.get_state() for name, gen in self.generators.items()}}
        if self._stale:  # other settings' files go; this run's records, already begun, stay
            for old in self.directory.iterdir():
                if old.name != records_name(self.fingerprint):
                    shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
            self._stale = False
        path = self.directory / f"step-{step:08d}.safetensors"
        try:
            write_state(state, path)  # a kill or a full disk mid-write leaves the earlier files whole
        except (OSError, SafetensorError) as err:  # safetensors reports the OS's ENOSPC/EFBIG as its own
            raise CheckpointWriteFailed(f"could not write checkpoint {path} at step {step} ({err}); "
                                        f"{self.kept()}") from None
        self.last_step = step
        for _, old in self.files()[self.keep:]:
            old.unlink(missing_ok=True)

    def kept(self) -> str:
        return (f"the checkpoint of step {self.last_step} is kept in {self.directory}" if self.last_step
                else "no checkpoint had been written yet")


@dataclass(frozen=True)
class CheckpointSpec:
    """Where and how a training loop checkpoints: its folder, the settings a checkpoint must match to
    be resumed (the stage's params), and the `checkpoint` params (every, keep)."""

    directory: Path
    settings: dict
    every: int
    keep: int = 2

    @property
    def records(self) -> Path:
        """Where the stage keeps its curves' records so that a resumed run continues them."""
        return Path(self.directory) / records_name(fingerprint(self.settings))

    def checkpointer(self, stateful: dict[str, Any], generators: dict[str, torch.Generator],
                     accelerator: Accelerator | None = None) -> Checkpointer:
        directory = Path(self.directory)
        if accelerator is not None and accelerator.num_processes > 1:
            directory = directory / f"process-{accelerator.process_index}"  # each has its own data RNG
        return Checkpointer(directory, self.settings, self.every, stateful, generators, keep=self.keep)


def restore_agreed(checkpointer: Checkpointer, accelerator: Accelerator | None = None) -> int:
    """Restore; with several processes, all of them from the newest step every one of them has."""
    step = checkpointer.restore()
    if accelerator is None or accelerator.num_processes == 1:
        return step
    import torch.distributed as dist

    def extreme(value: int, op) -> int:
        t = torch.tensor([value], device=accelerator.device)
        dist.all_reduce(t, op=op)
        return int(t.item())

    common = extreme(step, dist.ReduceOp.MIN)
    if step != common:
        step = checkpointer.restore(at_most=common)
    if extreme(step, dist.ReduceOp.MAX) != common or extreme(step, dist.ReduceOp.MIN) != common:
        raise TrainingStopped(f"the processes' checkpoints in {checkpointer.directory.parent} have no step in "
                              f"common; remove that folder to start afresh")
    return step


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """After the stage's outputs are saved the checkpoint has served its purpose."""
    shutil.rmtree(directory, ignore_errors=True)

