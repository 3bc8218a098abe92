"""One JDM iteration (generator + fake-score + LoRA updates) against one teacher denoising step,
same batch and resolution, side by side in one process, with a breakdown per network pass and the
overhead beyond the network passes the iteration needs.

The passes one iteration needs, each timed alone on the same inputs (`needed_passes`): the generator
(UNet + ControlNet) forward and backward; the teacher and the fake score forward; the consistency
model forward and backward to x_t (the condition gradient); then per fake-score update: the fake
score forward and backward, the consistency model forward and backward to its LoRA, the EMA target's
forward (and a fresh generator forward, no grad, after the first update, which reuses the
generator's samples). Overhead = iteration - their sum: optimiser and EMA steps, noise, the
condition's surrogate, loss arithmetic, Python.

The iteration and the consistency model's passes are timed both ways the trainer can run them, in
alternating rounds: peft's LoRA (base layer plus two LoRA layers) and merged into each layer's weight
for the pass (`acceleration.merge_lora`, jdm/models/lora.py).

    python benchmarks/jdm_iteration.py [--profile tiny] [--batch N] [--repeats 5] [--rounds 4]

The JDM settings (batch, fake-score steps per generator step, t_gen, LoRA rank, condition t-range)
are the profile's `jdm` section unless given.

Prints ratios, writes benchmarks/results/jdm_iteration_<profile>_fake<N>.json. Run alone: two torch processes on two
cores slow each other by 4-40x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import machine, profile_nets, write_result  # noqa: E402

from jdm.models.fake_score import build_fake_score  # noqa: E402
from jdm.models.lora import base_parameters, consistency_mode  # noqa: E402
from jdm.training.jdm import JDMSettings, JDMTrainer  # noqa: E402
from jdm.training.phases import build_generator, unet_players  # noqa: E402
from jdm.training.teacher import denoising_loss  # noqa: E402


class PassTimer:
    """Wraps modules' forward to accumulate wall time per named network pass."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self.active = True

    def wrap(self, name: str, module: torch.nn.Module) -> None:
        forward = module.forward

        def timed(*args, **kwargs):
            if not self.active:
                return forward(*args, **kwargs)
            sync()
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            sync()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return out
        module.forward = timed


def sync() -> None:
    """Wait for the GPU's queued kernels, so the clock reads their time (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds_per_call(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def needed_passes(generator, teacher, fake, lora, control: dict, hidden, mask, size: int, fake_steps: int,
                  repeats: int, g: torch.Generator, *, guided: bool, condition_rows: int, merged: bool,
                  only: tuple[str, ...] | None = None) -> dict[str, float]:
    """Seconds per iteration of each network pass a JDM iteration needs, each timed alone (module doc),
    as the iteration runs them: the teacher on the prompt and the empty prompt at once when `guided`
    (real-score CFG), the condition gradient on the `condition_rows` rows whose t is in its range, the
    consistency model's passes with the LoRA `merged` or not; and, apart (not needed), that gradient
    on every row, as taken before it skipped the others. `only`: these passes alone."""
    n = len(hidden)
    z = torch.randn(n, fake.config.in_channels, size, size, generator=g).to(hidden.device)
    t = torch.randint(20, 980, (n,), generator=g).to(hidden.device)

    def eps(net, x, rows=n):
        return net(x[:rows], t[:rows], encoder_hidden_states=hidden[:rows], encoder_attention_mask=mask[:rows]).sample

    def teacher_forward():
        x, tt, h, m = (torch.cat([z, z]), torch.cat([t, t]), torch.cat([hidden, hidden]), torch.cat([mask, mask])) if guided \
            else (z, t, hidden, mask)
        teacher(x, tt, encoder_hidden_states=h, encoder_attention_mask=m)

    def generator_forward_backward():
        generator(z, hidden, mask, control).sum().backward()
        generator.zero_grad(set_to_none=True)

    def fake_forward_backward():
        eps(fake, z).sum().backward()
        fake.zero_grad(set_to_none=True)

    def consistency_grad_to_x(rows):
        def call():
            x = z.clone().requires_grad_(True)
            with consistency_mode(fake, merged):
                torch.autograd.grad(eps(fake, x, rows).sum(), x)
        return call

    def consistency_grad_to_lora():
        with consistency_mode(fake, merged):
            torch.autograd.grad(eps(fake, z).sum(), lora)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                fn()
        return call

    def consistency_forward():
        with consistency_mode(fake, merged):
            eps(fake, z)

    per_call = {"generator_forward_backward": generator_forward_backward,
                "teacher_forward": no_grad(teacher_forward),
                "fake_score_forward": no_grad(lambda: eps(fake, z)),
                "consistency_forward_backward_to_x": consistency_grad_to_x(condition_rows),
                "consistency_forward_backward_to_x_every_row": consistency_grad_to_x(n),
                "fake_score_forward_backward": fake_forward_backward,
                "consistency_forward_backward_to_lora": consistency_grad_to_lora,
                "consistency_target_forward": no_grad(consistency_forward),
                "generator_forward": no_grad(lambda: generator(z, hidden, mask, control))}
    calls = {"generator_forward_backward": 1, "teacher_forward": 1, "fake_score_forward": 1,
             "consistency_forward_backward_to_x": 1 if condition_rows else 0,
             "consistency_forward_backward_to_x_every_row": 1, "fake_score_forward_backward": fake_steps,
             "consistency_forward_backward_to_lora": fake_steps, "consistency_target_forward": fake_steps,
             "generator_forward": fake_steps - 1}
    return {name: calls[name] * seconds_per_call(fn, repeats) for name, fn in per_call.items()
            if calls[name] and (only is None or name in only)}


CONSISTENCY_PASSES = ("consistency_forward_backward_to_x", "consistency_forward_backward_to_x_every_row",
                      "consistency_forward_backward_to_lora", "consistency_target_forward")


def optimizer_step_seconds(params: list[torch.nn.Parameter], repeats: int) -> dict[str, float]:
    """AdamW's step over the generator's trainable weights: torch's default (foreach) against fused."""
    out = {}
    for name, kwargs in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        copies = [torch.nn.Parameter(q.detach().clone()) for q in params]
        for q in copies:
            q.grad = torch.randn_like(q)
        opt = torch.optim.AdamW(copies, lr=1e-5, **kwargs)
        out[name] = seconds_per_call(opt.step, 5 * repeats)
    return out


@dataclass
class Steps:
    """One teacher denoising step and one JDM iteration on the same batch, ready to time."""

    teacher_step: Callable[[], None]
    trainer: JDMTrainer
    generator: torch.nn.Module
    fake: torch.nn.Module
    lora: list
    hidden: torch.Tensor
    mask: torch.Tensor

    def networks(self) -> list[torch.nn.Module]:
        return [self.generator.unet, *self.generator.controlnets.values(), self.fake]


def build_steps(nets, batch: int, fake_steps: int, g: torch.Generator, timer: PassTimer | None = None) -> Steps:
    """The teacher's own training step (the unit everything is measured in) and a JDM trainer with the
    profile's settings, on the device the profile's networks and data are on."""
    p, teacher = nets.params.jdm, nets.teacher
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-4)
    with torch.no_grad():
        x0 = nets.backbone.encode(nets.images[:batch])  # pixels * 2 - 1, or SD's latents
    hidden, mask = nets.data.hidden[nets.data.prompt_ids[:batch]], nets.data.mask[nets.data.prompt_ids[:batch]]

    def teacher_step():
        teacher.train().requires_grad_(True)
        loss = denoising_loss(teacher, nets.noise_scheduler, x0, hidden, mask, g, 5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.eval().requires_grad_(False)

    teacher.eval().requires_grad_(False)
    generator = build_generator(teacher, nets.schedule, nets.condition, nets.backbone, t_gen=p.t_gen)
    fake, lora = build_fake_score(teacher, lora_rank=p.lora_rank)
    device = next(teacher.parameters()).device  # the new ControlNet is built on the CPU: join the teacher
    generator.to(device), fake.to(device)
    if timer is not None:
        timer.wrap("generator_unet", generator.unet)
        timer.wrap("controlnet", generator.controlnet(nets.condition.name))
        timer.wrap("fake_score/consistency", fake)
        timer.wrap("teacher", teacher)
    # the players the phases build: the real score guided at the profile's CFG scale (its CFG pass runs
    # on twice the batch), the condition term below condition_t_max
    players = unet_players(generator, teacher, fake, nets.condition, nets.data, nets.backbone, g,
                           real_guidance_scale=p.real_guidance_scale)
    settings = replace(JDMSettings.from_params(p), fake_steps=fake_steps)
    trainer = JDMTrainer(players, nets.schedule, settings,
                         generator_optimizer=torch.optim.AdamW([q for q in generator.parameters() if q.requires_grad], lr=1e-5),
                         fake_optimizer=torch.optim.AdamW(base_parameters(fake), lr=1e-5),
                         lora_optimizer=torch.optim.AdamW(lora, lr=1e-5), lora_params=lora, batch_size=batch, rng=g)
    return Steps(teacher_step, trainer, generator, fake, lora, hidden, mask)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--batch", type=int, default=None, help="default: the profile's jdm.batch_size")
    ap.add_argument("--fake-steps", type=int, default=None, help="default: the profile's jdm.fake_steps")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds of teacher step and both iterations")
    ap.add_argument("--width-divisor", type=int, default=1, help="sd15: SD 1.5's widths divided by this (CPU checks)")
    args = ap.parse_args()
    nets = profile_nets(args.profile, num=max(16, args.batch or 0), width_divisor=args.width_divisor)
    nets = nets.to("cuda" if torch.cuda.is_available() else "cpu")  # on a GPU worker, the GPU's passes
    p = nets.params.jdm
    args.batch = args.batch or p.batch_size
    fake_steps = args.fake_steps or p.fake_steps
    g = torch.Generator().manual_seed(0)
    size, teacher, condition, data = nets.size, nets.teacher, nets.condition, nets.data
    timer = PassTimer()
    steps = build_steps(nets, args.batch, fake_steps, g, timer)
    generator, fake, lora, trainer = steps.generator, steps.fake, steps.lora, steps.trainer

    # alternating rounds (teacher step, iteration with peft's LoRA, with the LoRA merged), so a drift of
    # the machine's speed during the run moves all three alike
    modes = {"peft": False, "merged": True}
    for merged in modes.values():  # warm-up, so the timer counts only the timed iterations
        trainer.merge_lora = merged
        trainer.step()
    timer.seconds.clear()
    timer.calls.clear()
    rounds: dict[str, list[float]] = {"teacher": [], **{mode: [] for mode in modes}}
    for _ in range(args.rounds):
        rounds["teacher"].append(seconds_per_call(steps.teacher_step, args.repeats))
        for mode, merged in modes.items():
            trainer.merge_lora, timer.active = merged, not merged  # the per-network forwards: peft's iterations
            rounds[mode].append(seconds_per_call(trainer.step, args.repeats, warm_up=False))
    timer.active = False
    mean = {name: sum(times) / len(times) for name, times in rounds.items()}
    teacher_s, jdm_s = mean["teacher"], mean["peft"]
    timed = args.rounds * args.repeats
    forward = {k: v / timed for k, v in timer.seconds.items()}
    calls = {k: v / timed for k, v in timer.calls.items()}
    lo, hi = trainer.t_range
    condition_rows = round(args.batch * (min(trainer.cond_t_max or hi, hi) - lo + 1) / (hi - lo + 1))
    def passes(merged: bool, only: tuple[str, ...] | None = None) -> dict[str, float]:
        return needed_passes(generator, teacher, fake, lora, {condition.name: data.maps[:args.batch]}, steps.hidden,
                             steps.mask, size, fake_steps, args.repeats, g, guided=p.real_guidance_scale != 1.0,
                             condition_rows=condition_rows, merged=merged, only=only)

    needed = {"peft": passes(False)}
    # merging changes the consistency model's passes only: the others are peft's, timed once
    needed["merged"] = {**needed["peft"], **passes(True, CONSISTENCY_PASSES)}
    every_row = {mode: times.pop("consistency_forward_backward_to_x_every_row") for mode, times in needed.items()}
    needed_s = {mode: sum(times.values()) for mode, times in needed.items()}
    adamw = optimizer_step_seconds([q for q in generator.parameters() if q.requires_grad], args.repeats)
    result = {"profile": args.profile, "batch": args.batch, "resolution": size, "fake_steps": fake_steps,
              "rounds": args.rounds, "repeats": args.repeats,
              "teacher_step_s": teacher_s, "jdm_iteration_s": jdm_s, "ratio": jdm_s / teacher_s,
              "forward_s_per_iteration": forward,
              "forward_calls_per_iteration": calls,
              "backward_and_optimizer_s": jdm_s - sum(forward.values()),
              "needed_passes_s": needed["peft"], "needed_passes_total_s": needed_s["peft"],
              "condition_rows": condition_rows, "condition_gradient_every_row_s": every_row["peft"],
              "overhead_s": jdm_s - needed_s["peft"], "overhead_fraction": (jdm_s - needed_s["peft"]) / needed_s["peft"],
              "merge_lora": {"jdm_iteration_s": mean["merged"], "ratio": mean["merged"] / teacher_s,
                             "speedup": jdm_s / mean["merged"], "needed_passes_s": needed["merged"],
                             "needed_passes_total_s": needed_s["merged"],
                             "condition_gradient_every_row_s": every_row["merged"],
                             "overhead_fraction": (mean["merged"] - needed_s["merged"]) / needed_s["merged"]},
              "seconds_per_round": rounds,
              "generator_adamw_step_s": adamw, "fused_vs_foreach": adamw["foreach"] / adamw["fused"],
              "machine": machine()}
    print(json.dumps(result, indent=2))
    shrunk = f"_widths-over-{args.width_divisor}" if args.width_divisor != 1 else ""
    out = write_result(f"jdm_iteration_{args.profile}{shrunk}_fake{fake_steps}", result)
    merged = result["merge_lora"]
    print(f"one JDM iteration = {result['ratio']:.2f} teacher denoising steps (batch {args.batch}, {size}x{size}, "
          f"{fake_steps} fake-score update(s)), {merged['ratio']:.2f} with the LoRA merged ({merged['speedup']:.2f}x); "
          f"its network passes alone take {needed_s['peft']:.3f} s of its {jdm_s:.3f} s ({needed_s['merged']:.3f} s "
          f"of {mean['merged']:.3f} s merged): overhead {100 * result['overhead_fraction']:.1f}%; fused AdamW step "
          f"{result['fused_vs_foreach']:.2f}x as fast as foreach -> {out}")


if __name__ == "__main__":
    main()
