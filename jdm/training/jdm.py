"""One JDM iteration: generator update, then fake-score and consistency-LoRA updates (TTUR).

The players come in as callables with the batch context (prompt, control) bound by `sample`, so the
same loop trains the analytic toy (tests) and the UNet + ControlNet generator (warm-up and extension).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from diffusers.training_utils import EMAModel

from ..config import JDMParams
from ..models.lora import consistency_mode
from ..objectives import (VPSchedule, condition_grad, consistency_ladder, consistency_loss, fake_score_loss,
                          generator_loss)
from .loop import check_finite
from .parallel import Shard, average_gradients


@dataclass
class JDMSettings:
    """The trainer's share of the `jdm` params: build it with `from_params` (JDMParams in jdm/config.py
    holds the defaults, their reasons and their checks; there is no second copy here)."""

    condition_weight: float
    condition_t_max: float | None         # fraction of T; the condition term only below it (None: all t)
    condition_on_x: bool                  # ablation: grad log p(c | x) on the generator output
    t_min: float
    t_max: float
    fake_steps: int                       # fake-score / LoRA updates per generator update
    consistency_steps: int                # N of the consistency ladder
    consistency_ema: float                # EMA of the LoRA used as the consistency target

    @classmethod
    def from_params(cls, params: JDMParams) -> "JDMSettings":
        return cls(**{f.name: getattr(params, f.name) for f in fields(cls)})


@dataclass
class Players:
    """`sample(n, grad)` -> (x, ctx) draws generator samples and their context (prompt, control).

    `real_eps`, `fake_eps(x_t, t, ctx)`: teacher and fake score. `fake_score` is the fake-score module
    carrying the consistency LoRA (adapter on = consistency model). `log_likelihood(x0, ctx)`: log p(c | x0),
    or None for plain score distillation (implicit VSD / Diff-Instruct); its gradient reaches x_t through
    the consistency model. `condition_grad(x_t, t, ctx)`, when given, is grad_{x_t} log p(c | x_t) itself,
    for a condition whose gradient at x_t is known without the consistency model (decoupled CFG: a
    guidance model's classifier-free guidance); then `log_likelihood` must be None.
    """

    sample: Callable[[int, bool], tuple[torch.Tensor, Any]]
    real_eps: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    fake_eps: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    fake_score: torch.nn.Module
    log_likelihood: Callable[[torch.Tensor, Any], torch.Tensor] | None
    condition_grad: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None


class JDMTrainer:
    def __init__(self, players: Players, schedule: VPSchedule, settings: JDMSettings, *,
                 generator_optimizer: torch.optim.Optimizer, fake_optimizer: torch.optim.Optimizer,
                 lora_optimizer: torch.optim.Optimizer, lora_params: list[torch.nn.Parameter],
                 batch_size: int, rng: torch.Generator, shard: Shard = Shard(), merge_lora: bool = False):
        """`batch_size` per process; `rng` the stream every process shares, of which `shard` keeps this
        process's rows (jdm/training/parallel.py); `merge_lora`: the consistency model's passes with the
        LoRA merged into each layer's weight (`consistency_mode`; the same up to float rounding)."""
        if players.condition_grad is not None and (players.log_likelihood is not None or settings.condition_on_x):
            raise ValueError("a direct condition gradient (condition_grad) replaces log_likelihood and is taken at "
                             "x_t: give one of the two, and not with condition_on_x")
        self.p, self.schedule, self.s = players, schedule, settings
        self.gen_opt, self.fake_opt, self.lora_opt = generator_optimizer, fake_optimizer, lora_optimizer
        self.lora_params = lora_params
        self.lora_target = EMAModel(lora_params, decay=settings.consistency_ema)
        self.batch_size, self.rng, self.shard, self.merge_lora = batch_size, rng, shard, merge_lora
        T = schedule.num_timesteps
        last = lambda fraction: min(int(fraction * T), T - 1)  # noqa: E731  (1.0 is the schedule's last step, T - 1)
        self.t_range = (int(settings.t_min * T), last(settings.t_max))
        self.cond_t_max = None if settings.condition_t_max is None else min(last(settings.condition_t_max), self.t_range[1])
        # the consistency model is only asked for t <= condition_t_max; near T its clean prediction
        # divides by alpha_t ~ 0 and the consistency loss blows up, so the ladder stops where it is used
        self.ladder = consistency_ladder(settings.consistency_steps, T, self.cond_t_max or self.t_range[1])

    def _t(self, x: torch.Tensor) -> torch.Tensor:
        """A timestep per sample of `x`, on its device (drawn on the CPU, as all the loop's randomness)."""
        return self.shard.draw(lambda m: torch.randint(self.t_range[0], self.t_range[1] + 1, (m,), generator=self.rng),
                               len(x)).to(x.device)

    def _eps(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard.draw(lambda m: torch.randn((m, *x.shape[1:]), generator=self.rng), len(x)).to(x)

    # The adapter stays on across forward *and* backward of everything below: peft switches the
    # LoRA's requires_grad with the adapter, and autograd.grad refuses parameters that lost it.
    def _consistency_eps(self, ctx):
        return lambda x_t, t: self.p.fake_eps(x_t, t, ctx)

    def _target_eps(self, ctx):
        """The consistency model with the EMA LoRA weights swapped in (call in consistency mode)."""
        def eps(x_t, t):
            self.lora_target.store(self.lora_params)
            self.lora_target.copy_to(self.lora_params)
            try:
                return self.p.fake_eps(x_t, t, ctx)
            finally:
                self.lora_target.restore(self.lora_params)
        return eps

    def _condition_grad(self, ctx, x_t, t):
        with consistency_mode(self.p.fake_score, self.merge_lora):
            return condition_grad(self._consistency_eps(ctx), lambda x0: self.p.log_likelihood(x0, ctx),
                                  x_t, t, self.schedule)

    def generator_step(self) -> dict:
        x, ctx = self.p.sample(self.batch_size, True)
        t = self._t(x)
        condition = None
        if self.p.condition_grad is not None:
            condition = lambda x_t, t_, rows: self.p.condition_grad(x_t, t_, context_rows(ctx, rows))  # noqa: E731
        elif self.p.log_likelihood is not None:
            condition = lambda x_t, t_, rows: self._condition_grad(context_rows(ctx, rows), x_t, t_)  # noqa: E731
        terms = generator_loss(x, t, self._eps(x), self.schedule,
                               real_eps=lambda x_t, t_: self.p.real_eps(x_t, t_, ctx),
                               fake_eps=lambda x_t, t_: self.p.fake_eps(x_t, t_, ctx),
                               condition=condition, condition_weight=self.s.condition_weight,
                               condition_t_max=self.cond_t_max, condition_on_x=self.s.condition_on_x)
        self.gen_opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        average_gradients(_params(self.gen_opt), self.shard)
        grad_norm = check_finite(terms.loss, _params(self.gen_opt), "generator")
        self.gen_opt.step()
        self._reuse = (x.detach(), ctx)  # the first fake-score update trains on these samples
        return {"loss_generator": terms.loss.item(), "fidelity_norm": terms.fidelity_norm,
                "condition_norm": terms.condition_norm, "grad_norm_generator": grad_norm}

    def fake_step(self, x: torch.Tensor, ctx: Any) -> dict:
        t = self._t(x)
        loss_fake = fake_score_loss(lambda x_t, t_: self.p.fake_eps(x_t, t_, ctx), x, t, self._eps(x), self.schedule)
        self.fake_opt.zero_grad(set_to_none=True)
        loss_fake.backward()
        average_gradients(_params(self.fake_opt), self.shard)
        grad_norm_fake = check_finite(loss_fake, _params(self.fake_opt), "fake score")
        self.fake_opt.step()

        k = self.shard.draw(lambda m: torch.randint(1, len(self.ladder), (m,), generator=self.rng), len(x))
        with consistency_mode(self.p.fake_score, self.merge_lora):
            loss_cons = consistency_loss(self._consistency_eps(ctx), self._target_eps(ctx), x, self._eps(x), k,
                                         self.ladder, self.schedule)
            grads = torch.autograd.grad(loss_cons, self.lora_params)  # the LoRA only, never the fake score
        for p, g in zip(self.lora_params, grads):
            p.grad = g
        average_gradients(self.lora_params, self.shard)
        grad_norm_lora = check_finite(loss_cons, self.lora_params, "consistency")
        self.lora_opt.step()
        self.lora_opt.zero_grad(set_to_none=True)
        self.lora_target.step(self.lora_params)
        return {"loss_fake_score": loss_fake.item(), "loss_consistency": loss_cons.item(),
                "grad_norm_fake_score": grad_norm_fake, "grad_norm_consistency": grad_norm_lora}

    def step(self) -> dict:
        logs = self.generator_step()
        for i in range(self.s.fake_steps):
            if i == 0:
                x, ctx = self._reuse
            else:
                with torch.no_grad():
                    x, ctx = self.p.sample(self.batch_size, False)
            logs.update(self.fake_step(x, ctx))
        return logs


def context_rows(ctx: Any, rows: torch.Tensor) -> Any:
    """The rows `rows` (a boolean mask over the batch) of a batch context: a tensor, a dict or tuple of
    them (prompt ids, embeddings, control maps) or None; what is not a tensor is shared by every row."""
    if torch.is_tensor(ctx):
        return ctx[rows.to(ctx.device)]
    if isinstance(ctx, dict):
        return {k: context_rows(v, rows) for k, v in ctx.items()}
    if isinstance(ctx, (tuple, list)):
        return type(ctx)(context_rows(v, rows) for v in ctx)
    return ctx


def _params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]
