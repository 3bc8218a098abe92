"""Where and in what precision the training loops run: accelerate's device and mixed precision, and
torch.compile behind a flag (params.yaml `acceleration`, a DVC param of every training stage: both
change the numbers a stage writes).

- Mixed precision is accelerate's autocast: the forward and backward compute in bf16, the trainable
  weights and optimiser states stay float32 (`check_trainable_fp32`). Only bf16: fp16 needs a
  gradient scaler, and the JDM iteration takes the consistency LoRA's gradient with
  `torch.autograd.grad`, which a scaler does not see.
- torch.compile compiles each network in place (`nn.Module.compile`), so its state_dict keys and the
  parameter objects the optimisers, EMA and checkpoints hold stay the same (the wrapper that
  `torch.compile(module)` returns prefixes every key with `_orig_mod.`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

from ..config import AccelerationParams

if TYPE_CHECKING:
    from accelerate import Accelerator


def make_accelerator(acceleration: AccelerationParams) -> Accelerator:
    from accelerate import Accelerator

    # the explicit argument wins over `accelerate launch --mixed_precision` and the launcher's config
    # file: the precision a run used is the one params.yaml (and so DVC) records
    return Accelerator(mixed_precision=acceleration.mixed_precision)


# dynamo keeps one cache per code object, and every diffusers model's forward runs through the same
# peft wrapper: teacher, generator and fake score (LoRA on and off, with and without grad, two batch
# sizes) need more graphs than its default 8, past which it silently falls back to eager (measured)
RECOMPILE_LIMIT = 64


def compile_networks(networks: Iterable[torch.nn.Module], acceleration: AccelerationParams) -> None:
    if acceleration.compile is None:
        return
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for net in networks:
        net.compile(backend=acceleration.compile)
