"""One JDM iteration (generator + fake-score + LoRA updates) against one teacher denoising step,
same batch and resolution, side by side in one process, with a breakdown per network pass.

    python benchmarks/jdm_iteration.py [--profile tiny] [--batch N] [--repeats 3]

The JDM settings (batch, fake-score steps per generator step, t_gen, LoRA rank, condition t-range)
are the profile's `jdm` section unless given.

Prints ratios, writes benchmarks/results/jdm_iteration.json. Run alone: two torch processes on two
cores slow each other by 4-40x.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from jdm.conditions import load_condition
from jdm.config import load_params
from jdm.models.backbone import Backbone
from jdm.models.lora import base_parameters
from jdm.models.unet import build_noise_scheduler, build_unet
from jdm.objectives import VPSchedule
from jdm.models.fake_score import build_fake_score
from jdm.training.jdm import JDMSettings, JDMTrainer
from jdm.training.phases import ControlData, build_generator, unet_players
from jdm.training.teacher import denoising_loss


class PassTimer:
    """Wraps modules' forward to accumulate wall time per named network pass."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)

    def wrap(self, name: str, module: torch.nn.Module) -> None:
        forward = module.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return out
        module.forward = timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--batch", type=int, default=None, help="default: the profile's jdm.batch_size")
    ap.add_argument("--fake-steps", type=int, default=None, help="default: the profile's jdm.fake_steps")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    params = load_params(Path("profiles") / f"{args.profile}.yaml")
    p = params.jdm
    args.batch = args.batch or p.batch_size
    fake_steps = args.fake_steps or p.fake_steps
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    size = params.data.image_size
    teacher = build_unet(params.teacher.unet, size, 1, 384)
    noise_scheduler = build_noise_scheduler(params.teacher)
    schedule = VPSchedule.from_scheduler(noise_scheduler)
    condition, backbone = load_condition("canny", params), Backbone(1)
    images = torch.rand(256, 1, size, size, generator=g)
    data = ControlData(condition.extract(images), torch.randint(1, 41, (256,), generator=g),
                       torch.randn(41, 16, 384, generator=g), torch.ones(41, 16, dtype=torch.long))

    # the teacher's own training step, the unit everything is measured in
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-4)
    x0 = images[:args.batch] * 2 - 1
    hidden, mask = data.hidden[data.prompt_ids[:args.batch]], data.mask[data.prompt_ids[:args.batch]]

    def teacher_step():
        loss = denoising_loss(teacher, noise_scheduler, x0, hidden, mask, g, 5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    teacher.eval().requires_grad_(False)
    generator = build_generator(teacher, schedule, condition, backbone, t_gen=p.t_gen)
    fake, lora = build_fake_score(teacher, lora_rank=p.lora_rank)
    timer = PassTimer()
    timer.wrap("generator_unet", generator.unet)
    timer.wrap("controlnet", generator.controlnet(condition.name))
    timer.wrap("fake_score/consistency", fake)
    players = unet_players(generator, teacher, fake, condition, data, backbone, g)
    timer.wrap("teacher", teacher)
    settings = JDMSettings(condition_weight=p.condition_weight, condition_t_max=p.condition_t_max, t_min=p.t_min,
                           t_max=p.t_max, fake_steps=fake_steps, consistency_steps=p.consistency_steps)
    trainer = JDMTrainer(players, schedule, settings,
                         generator_optimizer=torch.optim.AdamW([q for q in generator.parameters() if q.requires_grad], lr=1e-5),
                         fake_optimizer=torch.optim.AdamW(base_parameters(fake), lr=1e-5),
                         lora_optimizer=torch.optim.AdamW(lora, lr=1e-5), lora_params=lora, batch_size=args.batch, rng=g)

    teacher.train().requires_grad_(True)
    teacher_step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.repeats):
        teacher_step()
    teacher_s = (time.perf_counter() - start) / args.repeats
    teacher.eval().requires_grad_(False)

    trainer.step()  # warm-up
    timer.seconds.clear()
    timer.calls.clear()
    start = time.perf_counter()
    for _ in range(args.repeats):
        trainer.step()
    jdm_s = (time.perf_counter() - start) / args.repeats
    forward = {k: v / args.repeats for k, v in timer.seconds.items()}
    result = {"profile": args.profile, "batch": args.batch, "fake_steps": fake_steps, "threads": torch.get_num_threads(),
              "teacher_step_s": teacher_s, "jdm_iteration_s": jdm_s, "ratio": jdm_s / teacher_s,
              "forward_s_per_iteration": forward,
              "forward_calls_per_iteration": {k: v / args.repeats for k, v in timer.calls.items()},
              "backward_and_optimizer_s": jdm_s - sum(forward.values())}
    print(json.dumps(result, indent=2))
    print(f"one JDM iteration = {result['ratio']:.2f} teacher denoising steps (batch {args.batch}, {size}x{size})")
    out = Path(f"benchmarks/results/jdm_iteration_{args.profile}_fake{fake_steps}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
