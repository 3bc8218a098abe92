"""Inference: JDM's one-step generator (UNet + ControlNet, 1 NFE) against the 50-step ControlNet
pipeline with CFG (the teacher + a ControlNet, diffusers' scheduler) on the same backbone, batch and
inputs, side by side in one process. Images per second at `--batch`, latency at batch 1, and the
ratio; one-step variants of the fast path (autograd off by no_grad vs inference_mode, channels-last)
are timed in the same run, interleaved over rounds, so each is kept only if it shows.

    python benchmarks/inference.py [--profile tiny] [--batch 16] [--condition canny] [--check]

`--check` exits 1 unless the one-step path is faster than the multi-step one (a relation, not an
absolute time), for a regression gate on a quiet machine. Writes benchmarks/results/inference_<profile>.json. Run alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import RESULTS, machine, profile_nets, write_result  # noqa: E402

from jdm.evaluation import latency_ms, multi_step_sampler, one_step_sampler  # noqa: E402
from jdm.models.generator import controlnet_from_unet  # noqa: E402
from jdm.training.phases import build_generator  # noqa: E402


def images_per_second(sampler, hidden, mask, maps, repeats: int, grad_mode) -> float:
    """Throughput over `repeats` batches after one warm-up batch, under `grad_mode` (a context)."""
    g = torch.Generator().manual_seed(0)
    with grad_mode():
        sampler(hidden, mask, maps, sampler.noise(len(hidden), g))
        start = time.perf_counter()
        for _ in range(repeats):
            sampler(hidden, mask, maps, sampler.noise(len(hidden), g))
    return repeats * len(hidden) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--condition", default="canny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50, help="steps of the multi-step path (the paper's 50)")
    ap.add_argument("--repeats", type=int, default=10, help="one-step batches timed (the 50-step path: 1)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the one-step variants")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    ap.add_argument("--check", action="store_true", help="exit 1 unless one step is faster than the multi-step path")
    args = ap.parse_args()
    nets = profile_nets(args.profile, args.condition)
    e, p = nets.params.evaluation, nets.params.jdm
    generator = build_generator(nets.teacher, nets.schedule, nets.condition, nets.backbone, t_gen=p.t_gen).eval()
    generator.requires_grad_(False)
    controlnet = controlnet_from_unet(nets.teacher, nets.condition.channels, nets.backbone.factor).eval()
    controlnet.requires_grad_(False)
    ids = nets.data.prompt_ids[:args.batch]
    hidden, mask, maps = nets.data.hidden[ids], nets.data.mask[ids], nets.data.maps[:args.batch]
    null = (nets.data.hidden[:1], nets.data.mask[:1])
    one_step = one_step_sampler(generator, nets.condition.name, nets.backbone, nets.size)
    multi_step = multi_step_sampler(nets.teacher, nets.noise_scheduler.config, nets.backbone, nets.size, null,
                                    steps=args.steps, guidance_scale=e.guidance_scale, sampler=e.sampler,
                                    controlnet=controlnet)

    def one_step_variants() -> dict[str, float]:
        out = {"one_step": images_per_second(one_step, hidden, mask, maps, args.repeats, torch.no_grad),
               "one_step_inference_mode": images_per_second(one_step, hidden, mask, maps, args.repeats,
                                                            torch.inference_mode)}
        generator.to(memory_format=torch.channels_last)
        out["one_step_channels_last"] = images_per_second(one_step, hidden, mask, maps, args.repeats, torch.no_grad)
        generator.to(memory_format=torch.contiguous_format)
        return out

    # the one-step variants interleaved over rounds (median), so no variant gains from its place in the order
    rounds = [one_step_variants() for _ in range(args.rounds)]
    ips = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ips["multi_step"] = images_per_second(multi_step, hidden, mask, maps, 1, torch.no_grad)
    # latency_ms takes one held-out row per call (and one for warm-up): at most batch - 1 repeats
    latency = {"one_step": latency_ms(one_step, hidden, mask, maps, repeats=min(2 * args.repeats, args.batch - 1)),
               "multi_step": latency_ms(multi_step, hidden, mask, maps, repeats=2)}
    result = {"profile": args.profile, "condition": args.condition, "batch": args.batch, "resolution": nets.size,
              "nfe": {"one_step": one_step.nfe, "multi_step": multi_step.nfe}, "guidance_scale": e.guidance_scale,
              "images_per_s": ips, "latency_ms_batch1": latency,
              "speedup_throughput": ips["one_step"] / ips["multi_step"],
              "speedup_latency": latency["multi_step"] / latency["one_step"],
              "fast_path_ratio": {"inference_mode_vs_no_grad": ips["one_step_inference_mode"] / ips["one_step"],
                                  "channels_last_vs_contiguous": ips["one_step_channels_last"] / ips["one_step"]},
              "machine": machine()}
    out = write_result(f"inference_{args.profile}", result, args.results)
    print(f"one step (1 NFE): {ips['one_step']:.1f} images/s, {latency['one_step']:.1f} ms/image at batch 1")
    print(f"{args.steps}-step ControlNet with CFG ({multi_step.nfe} NFE): {ips['multi_step']:.2f} images/s, "
          f"{latency['multi_step']:.0f} ms/image at batch 1")
    print(f"one step is {result['speedup_throughput']:.1f}x faster at batch {args.batch} "
          f"({result['speedup_latency']:.1f}x at batch 1); fast path, one step: inference_mode "
          f"{result['fast_path_ratio']['inference_mode_vs_no_grad']:.3f}x no_grad, channels-last "
          f"{result['fast_path_ratio']['channels_last_vs_contiguous']:.3f}x contiguous ({args.profile}, "
          f"{nets.size}x{nets.size}, {machine()['device']}, {torch.get_num_threads()} threads) -> {out}")
    if args.check and not (result["speedup_throughput"] > 1 and result["speedup_latency"] > 1):
        print("REGRESSION: the one-step path is not faster than the multi-step path", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
