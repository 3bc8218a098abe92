"""Data-parallel JDM phases under `accelerate launch` (docs/operations.md, "Several processes").

Every process draws the *whole* batch from one shared random stream and keeps its own rows of it
(`Shard`), so N processes of batch B train on exactly the samples a one-process run of batch N*B
draws, and the only difference between the two is float rounding. After each backward pass the
gradients are averaged over the processes (`average_gradients`): what DDP's hooks do, done by hand
because the JDM iteration runs three networks in several modes (the fake score with its LoRA on and
off, the LoRA's gradient taken by `torch.autograd.grad`), which a DDP wrapper's single forward does
not see. Weights, optimiser states, EMAs and the consistency target then stay identical on every
process. One process (index 0 of 1) draws and updates exactly as it always did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState


def process_state() -> PartialState:
    """accelerate's view of this process; gloo across CPU processes when there is no GPU (torch elastic
    sets LOCAL_RANK for each process `accelerate launch` starts)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@dataclass(frozen=True)
class Shard:
    """This process's rows (`index` of `count`) of every batch drawn for all processes."""

    index: int = 0
    count: int = 1

    @classmethod
    def of(cls, processes: Accelerator | PartialState) -> "Shard":
        """This process's rows, from an Accelerator or accelerate's PartialState (same two attributes)."""
        return cls(processes.process_index, processes.num_processes)

    def draw(self, make: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
        """`make(m)` draws m rows; this process's n of the n * count drawn for all."""
        if self.count == 1:
            return make(n)
        return make(n * self.count)[self.index * n:(self.index + 1) * n]


def average_gradients(params: Iterable[torch.nn.Parameter], shard: Shard) -> None:
    """Average the gradients of `params` over the processes, in one collective (a no-op for one)."""
    if shard.count == 1:
        return
    import torch.distributed as dist

    params = list(params)
    for p in params:  # a parameter no loss reached here may be reached on another process
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= shard.count
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
