"""ControlNets trained by denoising on data: the baselines JDM is measured against (docs/method.md).

- On the teacher (`train_controlnet_on_teacher`): the ControlNet of diffusers'
  `examples/controlnet/train_controlnet.py` -- the teacher frozen, epsilon-prediction loss on noised
  images with their control maps, empty prompts mixed in for classifier-free guidance. Sampled with
  50 steps and CFG it is the "ControlNet (DM)" row; plugged into a one-step generator it is
  "DI + ControlNet".
- On a frozen one-step generator (`train_controlnet_on_generator`, Eq. 11): G(x_T, y, c) regressed on
  the clean image x, with x_T = alpha_T x + sigma_T eps at the generator's own timestep. It transfers
  the control but, being a regression, averages over x and gives blurry images (the paper's finding).

Both share one loop: batches of (image, control map, prompt), AdamW on the ControlNet only, under
accelerate, resumable, stopped with the step number when the loss or a gradient is not finite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from ..config import AccelerationParams
from ..data import EMPTY_PROMPT_ID
from ..models.backbone import Backbone
from ..models.generator import OneStepGenerator, controlnet_residuals
from .accel import compile_networks, make_accelerator
from .checkpoint import CheckpointSpec
from .loop import check_finite, check_trainable_fp32, run_steps
from .phases import ControlData
from .teacher import RunningLog, denoising_loss

if TYPE_CHECKING:
    from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

# loss(controlnet, x0, control, hidden, mask, rng) -> scalar; the ControlNet comes in as accelerate
# prepared it (wrapped for gradient all-reduce across processes)
BatchLoss = Callable[..., torch.Tensor]


def train_controlnet(controlnet: ControlNetModel, loss_fn: BatchLoss, data: ControlData, backbone: Backbone, *,
                     steps: int, batch_size: int, lr: float, prompt_dropout: float, seed: int,
                     log: Callable[[int, dict], None] | None = None, checkpoint: CheckpointSpec | None = None,
                     frozen: Sequence[torch.nn.Module] = (),
                     acceleration: AccelerationParams = AccelerationParams()) -> ControlNetModel:
    """Train `controlnet` alone for `steps` AdamW steps on `loss_fn`, resumable from `checkpoint`;
    return it, in eval mode, on the CPU. `frozen`: the networks `loss_fn` runs besides the ControlNet
    (the teacher, or the generator), placed on the same device; `acceleration`: mixed precision and
    torch.compile (jdm/training/accel.py)."""
    if data.images is None:
        raise ValueError("denoising a ControlNet needs the images the control maps came from (ControlData.images)")
    accelerator = make_accelerator(acceleration)
    device = accelerator.device
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + accelerator.process_index)
    controlnet.requires_grad_(True).train()
    check_trainable_fp32(controlnet.parameters(), "the ControlNet")
    for net in frozen:
        net.to(device)
    compile_networks([controlnet, *frozen], acceleration)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=1e-2)
    controlnet, optimizer = accelerator.prepare(controlnet, optimizer)
    logger = RunningLog(log if accelerator.is_main_process else None, steps)

    def step_fn(step: int) -> None:
        idx = torch.randint(len(data.maps), (batch_size,), generator=g)
        with torch.no_grad():  # the autoencoder stays on the CPU, as in the teacher's loop
            x0 = backbone.encode(data.images[idx].float()).to(device)
        pid = data.prompt_ids[idx]
        if prompt_dropout:
            pid = torch.where(torch.rand(len(pid), generator=g) < prompt_dropout, EMPTY_PROMPT_ID, pid)
        with accelerator.autocast():  # the frozen networks too, not only the prepared ControlNet
            loss = loss_fn(controlnet, x0, data.maps[idx].to(device), data.hidden[pid].to(device),
                           data.mask[pid].to(device), g)
        accelerator.backward(loss)
        grad_norm = check_finite(loss, controlnet.parameters(), "ControlNet denoising")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logger(step, loss.item(), grad_norm=grad_norm)

    stateful = {"controlnet": accelerator.unwrap_model(controlnet), "optimizer": optimizer}
    checkpoints = checkpoint.checkpointer(stateful, {"data": g}, accelerator) if checkpoint is not None else None
    run_steps(checkpoints, steps, step_fn, accelerator)
    accelerator.wait_for_everyone()
    for net in frozen:
        net.cpu()
    return accelerator.unwrap_model(controlnet).cpu().eval().requires_grad_(False)


def teacher_loss(teacher_unet: UNet2DConditionModel, noise_scheduler: DDPMScheduler, snr_gamma: float | None) -> BatchLoss:
    """Epsilon prediction of the frozen teacher plus the ControlNet's residuals (the teacher's own loss)."""
    teacher_unet.requires_grad_(False)

    def loss(controlnet, x0, control, hidden, mask, g):
        def eps(x_t, t, **kwargs):
            return teacher_unet(x_t, t, **kwargs,
                                **controlnet_residuals([(controlnet, control, 1.0)], x_t, t, kwargs["encoder_hidden_states"]))
        return denoising_loss(eps, noise_scheduler, x0, hidden, mask, g, snr_gamma)
    return loss


def generator_regression_loss(generator: OneStepGenerator) -> BatchLoss:
    """Eq. 11: || G(x_T, y, c) - x ||^2, x_T the image noised to the generator's timestep (its UNet frozen)."""
    generator.unet.requires_grad_(False)

    def loss(controlnet, x0, control, hidden, mask, g):
        t = torch.full((len(x0),), generator.t_gen, dtype=torch.long, device=x0.device)
        x_T = generator.schedule.noisy(x0, torch.randn(x0.shape, generator=g).to(x0), t)
        eps = generator.unet(x_T, t, encoder_hidden_states=hidden, encoder_attention_mask=mask,
                             **controlnet_residuals([(controlnet, control, 1.0)], x_T, t, hidden)).sample
        return F.mse_loss(generator.schedule.x0(x_T, eps, t), x0)
    return loss
