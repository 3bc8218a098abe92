"""The teacher: a text-conditional UNet trained by denoising, with prompt dropout for CFG.

Short CPU budgets need the usual remedies, each a parameter: an EMA of the weights (the EMA is what
is saved and sampled), min-SNR loss weighting, warm-up then cosine learning rate.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr

from ..config import AccelerationParams, TeacherParams
from ..data import EMPTY_PROMPT_ID, Split
from ..models.backbone import Backbone
from ..models.unet import build_noise_scheduler, build_unet
from .accel import compile_networks, make_accelerator
from .checkpoint import CheckpointSpec
from .loop import check_finite, check_trainable_fp32, run_steps

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel


def denoising_loss(unet: Callable[..., Any], noise_scheduler: DDPMScheduler, x0: torch.Tensor, hidden: torch.Tensor,
                   mask: torch.Tensor, generator: torch.Generator, snr_gamma: float | None) -> torch.Tensor:
    """Epsilon-prediction loss, min-SNR-gamma weighted (Hang et al. 2023) when `snr_gamma` is set."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    t = torch.randint(noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample
    per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(noise_scheduler, t)
    weight = torch.clamp(snr, max=snr_gamma) / snr
    return (per_sample * weight).mean()


def train_teacher(params: TeacherParams, train: Split, embeddings: tuple[torch.Tensor, torch.Tensor],
                  backbone: Backbone, *, seed: int, log: Callable[[int, dict], None] | None = None,
                  checkpoint: CheckpointSpec | None = None, init_unet: UNet2DConditionModel | None = None,
                  acceleration: AccelerationParams = AccelerationParams()) -> tuple[UNet2DConditionModel, DDPMScheduler]:
    """Train the teacher UNet; return (EMA UNet on the CPU, noise scheduler). Resumable from `checkpoint`.
    `init_unet`: start from a copy of these weights instead of a fresh UNet (decoupled CFG's guidance
    model is the teacher trained further).

    Under `accelerate launch` (several processes, gloo on CPU or NCCL on GPUs) each process draws its
    own batches (seed + process index) and accelerate averages the gradients: the effective batch is
    `batch_size x num_processes`. Only the main process logs. `acceleration`: mixed precision and
    torch.compile (jdm/training/accel.py)."""
    accelerator = make_accelerator(acceleration)
    torch.manual_seed(seed)  # the same initial weights in every process
    g = torch.Generator().manual_seed(seed + accelerator.process_index)
    hidden_table, mask_table = embeddings
    size = train.images.shape[-1] // backbone.factor
    if init_unet is None:
        unet = build_unet(params.unet, size, backbone.channels, hidden_table.shape[-1])
    else:
        unet = copy.deepcopy(init_unet).train().requires_grad_(True)
    noise_scheduler = build_noise_scheduler(params)
    ema = EMAModel(unet.parameters(), decay=params.ema_decay, model_cls=type(unet), model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=params.lr, weight_decay=1e-2)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, params.warmup_steps, params.steps)
    check_trainable_fp32(unet.parameters(), "the teacher UNet")
    compile_networks([unet], acceleration)
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    ema.to(accelerator.device)
    unet.train()
    logger = RunningLog(log if accelerator.is_main_process else None, params.steps)

    def step_fn(step: int) -> None:
        idx = torch.randint(len(train), (params.batch_size,), generator=g)
        with torch.no_grad():
            x0 = backbone.encode(train.pixels(idx)).to(accelerator.device)
        pid = train.prompt_ids[idx]
        pid = torch.where(torch.rand(len(pid), generator=g) < params.prompt_dropout, EMPTY_PROMPT_ID, pid)
        hidden, mask = hidden_table[pid].to(accelerator.device), mask_table[pid].to(accelerator.device)
        loss = denoising_loss(unet, noise_scheduler, x0, hidden, mask, g, params.snr_gamma)
        accelerator.backward(loss)
        grad_norm = check_finite(loss, unet.parameters(), "teacher")
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        logger(step, loss.item(), grad_norm=grad_norm, lr=lr_schedule.get_last_lr()[0])

    stateful = {"unet": accelerator.unwrap_model(unet), "optimizer": optimizer, "lr_schedule": lr_schedule, "ema": ema}
    checkpoints = checkpoint.checkpointer(stateful, {"data": g}, accelerator) if checkpoint is not None else None
    run_steps(checkpoints, params.steps, step_fn, accelerator)
    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(unet)
    ema.copy_to(unet.parameters())
    return unet.cpu().eval().requires_grad_(False), noise_scheduler


class RunningLog:
    """The loss averaged over the steps since the last log line (20 lines a run), plus the latest of
    other values; `log` None (a non-main process) logs nothing."""

    def __init__(self, log: Callable[[int, dict], None] | None, steps: int):
        self.log, self.steps, self.every = log, steps, max(1, steps // 20)
        self.total, self.count = 0.0, 0

    def __call__(self, step: int, loss: float, **latest: float) -> None:
        self.total, self.count = self.total + loss, self.count + 1
        if self.log is not None and (step % self.every == 0 or step == self.steps):
            self.log(step, {"loss": self.total / self.count, **latest})
            self.total, self.count = 0.0, 0
