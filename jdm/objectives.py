"""The JDM objective (docs/method.md): fake score, consistency LoRA, and the generator update.

Every function takes the networks as callables `eps(x_t, t) -> noise prediction` (prompts and
controls already bound), so the same code trains 2-D toy players with exact scores and UNets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LogLikelihood = Callable[[torch.Tensor], torch.Tensor]  # x0 -> log p(c | x0) per sample, c bound


class VPSchedule:
    """`x_t = alpha_t x + sigma_t eps` on the teacher's own discrete schedule."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.double().clamp(1e-12, 1.0)
        self.num_timesteps = len(alphas_cumprod)

    @classmethod
    def from_scheduler(cls, noise_scheduler: DDPMScheduler) -> "VPSchedule":
        return cls(noise_scheduler.alphas_cumprod)

    def coeffs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(like.device)[t.long()].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def noisy(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.coeffs(t, x)
        return alpha * x + sigma * eps

    def x0(self, x_t: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.coeffs(t, x_t)
        return (x_t - sigma * eps_hat) / alpha


def fake_score_loss(fake_eps: EpsFn, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                    schedule: VPSchedule) -> torch.Tensor:
    """Eq. 6: denoising on the student's own (detached) samples."""
    x_t = schedule.noisy(x.detach(), eps, t)
    return F.mse_loss(fake_eps(x_t, t), eps)


def consistency_fn(eps_fn: EpsFn, x_t: torch.Tensor, t: torch.Tensor, schedule: VPSchedule) -> torch.Tensor:
    """f(x_t, t) = x_t at t = 0 (ladder index), else the clean prediction of the LoRA-adapted fake score."""
    zero = (t < 0).view((-1,) + (1,) * (x_t.ndim - 1))
    t_pos = t.clamp(min=0)
    return torch.where(zero, x_t, schedule.x0(x_t, eps_fn(x_t, t_pos), t_pos))


def consistency_ladder(num_steps: int, num_timesteps: int, t_max: int | None = None) -> torch.Tensor:
    """N+1 points -1 (= clean data, f is the identity there), then N timesteps spread up to t_max."""
    t_max = num_timesteps - 1 if t_max is None else t_max
    steps = torch.linspace(0, t_max, num_steps).round().long()
    return torch.cat([torch.tensor([-1]), steps])


def consistency_loss(consistency_eps: EpsFn, target_eps: EpsFn, x: torch.Tensor, eps: torch.Tensor,
                     k: torch.Tensor, ladder: torch.Tensor, schedule: VPSchedule) -> torch.Tensor:
    """Eq. 8: f(x_{t_k}, t_k) matches sg f(x_{t_{k-1}}, t_{k-1}); both from the same x and eps.

    `target_eps` is the EMA of the consistency model (the measured-stable choice, docs/method.md)."""
    x = x.detach()
    t_hi, t_lo = ladder[k].to(x.device), ladder[k - 1].to(x.device)
    pred = consistency_fn(consistency_eps, schedule.noisy(x, eps, t_hi), t_hi, schedule)
    with torch.no_grad():
        x_lo = torch.where((t_lo < 0).view((-1,) + (1,) * (x.ndim - 1)), x, schedule.noisy(x, eps, t_lo.clamp(min=0)))
        target = consistency_fn(target_eps, x_lo, t_lo, schedule)
    return F.mse_loss(pred, target)


def condition_grad(consistency_eps: EpsFn, log_likelihood: LogLikelihood, x_t: torch.Tensor, t: torch.Tensor,
                   schedule: VPSchedule) -> torch.Tensor:
    """grad_{x_t} log p(c | f(x_t, t)): the condition term, through the consistency model."""
    with torch.enable_grad():
        x_t = x_t.detach().requires_grad_(True)
        x0 = consistency_fn(consistency_eps, x_t, t, schedule)
        (grad,) = torch.autograd.grad(log_likelihood(x0).sum(), x_t)
    return grad


def cfg_eps(eps_prompt: torch.Tensor, eps_null: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, eps(x_t, null) + s (eps(x_t, y) - eps(x_t, null)): the coupled baseline's
    real score (DMD) uses the teacher's."""
    return eps_null + scale * (eps_prompt - eps_null)


def cfg_condition_grad(eps_prompt: torch.Tensor, eps_null: torch.Tensor, sigma: torch.Tensor,
                       weight: float) -> torch.Tensor:
    """Decoupled CFG (docs/method.md): grad_{x_t} log p(y | x_t)^w = -(w / sigma_t) (eps_g(x_t, y) - eps_g(x_t, null))
    from a guidance model eps_g, the condition term beside the teacher's unguided fidelity term. With eps_g
    the teacher and w = s - 1 the two add up to the coupled baseline's CFG'd real score (`cfg_eps`)."""
    return -(weight / sigma) * (eps_prompt - eps_null)


@dataclass
class GeneratorTerms:
    loss: torch.Tensor
    fidelity_norm: float
    condition_norm: float


def generator_loss(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: VPSchedule, *,
                   real_eps: EpsFn, fake_eps: EpsFn,
                   condition: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   condition_weight: float = 1.0, condition_t_max: int | None = None,
                   condition_on_x: bool = False) -> GeneratorTerms:
    """The JDM generator update (docs/method.md, 'in practice').

    g = w_t [ (s_real - s_fake)(x_t) + lambda_c 1[t <= t_max] grad_{x_t} log p(c | x_t) ], moved along by
    descent on 0.5 ||x - sg(x + g)||^2; w_t = sigma_t^2 / alpha_t / mean|x - x0_real| (DMD's normaliser).
    `condition(x_t, t, rows)` returns the condition gradient (see `condition_grad`) of the batch's rows
    `rows` (a boolean mask: the caller slices its batch context with it); it is asked only for the rows
    with t <= t_max, the others' term being zero, so the consistency model's passes skip them (the same
    result up to float reassociation). With `condition_on_x` it is evaluated on the generator output
    itself (the paper's w/o-modelling-log p(c|x_t) ablation).
    """
    alpha, sigma = schedule.coeffs(t, x)
    with torch.no_grad():
        x_t = schedule.noisy(x.detach(), eps, t)
        e_real, e_fake = real_eps(x_t, t), fake_eps(x_t, t)
        g_fid = (e_fake - e_real) / sigma  # = s_real - s_fake
        g = g_fid
        g_cond = torch.zeros_like(x)
        if condition is not None and condition_weight:
            rows = t <= condition_t_max if condition_t_max is not None else torch.ones_like(t, dtype=torch.bool)
            if rows.any():
                # t = -1 makes the consistency model the identity: the gradient of log p(c | x) itself
                g_cond[rows] = (condition(x.detach()[rows], torch.full_like(t[rows], -1), rows) if condition_on_x
                                else condition(x_t[rows], t[rows], rows)).to(g_cond)
            g = g + condition_weight * g_cond
        x0_real = (x_t - sigma * e_real) / alpha
        dims = tuple(range(1, x.ndim))
        weight = sigma**2 / alpha / (x.detach() - x0_real).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        target = x.detach() + weight * g
    loss = 0.5 * F.mse_loss(x, target)
    return GeneratorTerms(loss, (weight * g_fid).norm().item(), (weight * condition_weight * g_cond).norm().item())
