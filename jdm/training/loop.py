"""The training step loop and its guards, shared by every training stage (teacher, ControlNets, the
JDM phases).

- `run_steps`: resume from the newest checkpoint (checkpoint.py), run the steps after it, save a
  checkpoint every `every` steps; a non-finite loss or gradient stops training with the step, the
  value and the last good checkpoint named (`TrainingDiverged`).
- `check_finite`: called by each update after its backward pass, before the optimiser step, so a
  NaN/Inf never reaches the weights or a checkpoint.
- `check_trainable_fp32`: called before training; trainable weights must be float32 (mixed precision
  is autocast, jdm/training/accel.py).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from ..progress import progress
from .checkpoint import Checkpointer, restore_agreed
from .errors import TrainingDiverged

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from accelerate import Accelerator


def run_steps(checkpointer: Checkpointer | None, steps: int, step_fn: Callable[[int], None],
              accelerator: Accelerator | None = None) -> int:
    """Resume, then run `step_fn(step)` up to `steps`, checkpointing every `checkpointer.every` steps
    (None: no checkpoints, e.g. a library call in a test); return the step resumed from. A non-finite
    loss or gradient (FloatingPointError from `step_fn`) stops training with the step, the value and
    the last good checkpoint named."""
    start = restore_agreed(checkpointer, accelerator) if checkpointer is not None else 0
    if start:
        log.info(f"resumed from the checkpoint of step {start} in {checkpointer.directory}")
    main = accelerator is None or accelerator.is_main_process
    for step in progress(range(start + 1, steps + 1), "training", total=steps, initial=start, enabled=main):
        try:
            step_fn(step)
        except FloatingPointError as err:
            kept = checkpointer.kept() if checkpointer is not None else "checkpoints are off"
            raise TrainingDiverged(f"training diverged at step {step}: {err}; {kept}") from None
        if checkpointer is not None and checkpointer.maybe_save(step) and accelerator is not None:
            accelerator.wait_for_everyone()
    return start


def check_finite(loss: torch.Tensor, params: Iterable[torch.nn.Parameter], what: str) -> float:
    """Raise FloatingPointError when the loss or the gradient of `params` is NaN/Inf; return the
    gradient norm (logged: a norm that grows warns before it overflows)."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} loss is {value}")
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
    if not math.isfinite(norm):
        raise FloatingPointError(f"{what} gradient norm is {norm} (loss {value:.6g})")
    return norm


def check_trainable_fp32(params: Iterable[torch.nn.Parameter], what: str) -> None:
    """Mixed precision computes in bf16/fp16 but updates fp32 master weights (accelerate autocasts);
    a trainable weight in half precision would lose small updates, so it is refused."""
    bad = {p.dtype for p in params if p.requires_grad and p.dtype != torch.float32}
    if bad:
        raise ValueError(f"{what} has trainable weights in {sorted(map(str, bad))}; trainable weights must be "
                         f"torch.float32 (mixed precision is autocast, set by accelerate's mixed_precision)")
