"""Mixed precision and torch.compile (params.yaml `acceleration`, jdm/training/accel.py) against fp32
eager, side by side in one process: one teacher denoising step and one JDM iteration per setting, on
the profile's networks (randomly initialised), on accelerate's device.

    python benchmarks/acceleration.py [--profile tiny] [--settings no,bf16,no+inductor] [--rounds 3]

Each setting builds its own networks from the same seed; the settings are then timed in turn, round
after round, and the median round is kept (timing one setting after another shows order effects of
up to 1.4x on this machine). The first calls, which compile where a backend is given, are timed apart.
Writes benchmarks/results/acceleration_<profile>_<settings>.json. Run alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from jdm_iteration import build_steps  # noqa: E402
from shapes import machine, profile_nets, write_result  # noqa: E402

from jdm.config import AccelerationParams  # noqa: E402
from jdm.evaluation import latency_ms, one_step_sampler  # noqa: E402
from jdm.training.accel import compile_networks, make_accelerator  # noqa: E402


def accelerator_for(acc: AccelerationParams):
    """accelerate keeps one precision per process (its AcceleratorState refuses a change): reset it
    between settings, the way accelerate's own tests do, so the settings interleave in one process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    return make_accelerator(acc)


def first_rows(data, k: int) -> tuple:
    """The prompt states, masks and control maps of the first `k` rows: what the latency samples."""
    pid = data.prompt_ids[:k]
    return data.hidden[pid], data.mask[pid], data.maps[:k]


def seconds(fn, acc: AccelerationParams, repeats: int) -> float:
    with accelerator_for(acc).autocast():
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--batch", type=int, default=None, help="default: the profile's jdm.batch_size")
    ap.add_argument("--settings", default="no,bf16",
                    help="comma-separated mixed precision[+compile backend], e.g. no,bf16,no+inductor; the first is the "
                         "baseline. Compiled settings share dynamo's caches: time one per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width-divisor", type=int, default=1,
                    help="sd15: every width of SD 1.5's shape divided by this (a CPU check of the code path)")
    ap.add_argument("--latency-repeats", type=int, default=5, help="single images timed per setting (median)")
    args = ap.parse_args()
    settings = {}
    for name in args.settings.split(","):
        precision, _, backend = name.partition("+")
        settings[name] = AccelerationParams(mixed_precision=precision, compile=backend or None)
    runs = {}
    cuda = torch.cuda.is_available()
    for name, acc in settings.items():
        held = torch.cuda.memory_allocated() if cuda else 0  # the settings built before this one
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        nets = profile_nets(args.profile, num=max(16, args.batch or 0),
                            width_divisor=args.width_divisor).to(accelerator_for(acc).device)
        p = nets.params.jdm
        steps = build_steps(nets, args.batch or p.batch_size, p.fake_steps, torch.Generator().manual_seed(0))
        compile_networks([nets.teacher, *steps.networks()], acc)
        # the first calls: warm-up, and with a compile backend the compiling
        first = {"teacher": seconds(steps.teacher_step, acc, 1), "jdm": seconds(steps.trainer.step, acc, 1)}
        runs[name] = {"acceleration": acc, "steps": steps, "first_call_s": first, "teacher": [], "jdm": [],
                      "one_step": one_step_sampler(steps.generator, nets.condition.name, nets.backbone, nets.size,
                                                   device=nets.images.device),
                      "inputs": first_rows(nets.data, args.latency_repeats + 1)}
        if cuda:  # this setting's own peak: its networks, optimiser states and one iteration's activations
            runs[name]["peak_memory_gib"] = (torch.cuda.max_memory_allocated() - held) / 2**30
        print(f"{name}: first calls {first['teacher']:.1f} s (teacher step), {first['jdm']:.1f} s (JDM iteration)", flush=True)
    for _ in range(args.rounds):
        for run in runs.values():
            run["teacher"].append(seconds(run["steps"].teacher_step, run["acceleration"], args.repeats))
            run["jdm"].append(seconds(run["steps"].trainer.step, run["acceleration"], args.repeats))
    for run in runs.values():  # one image at batch 1, the VAE's decoding included (sd15: 512 px)
        with accelerator_for(run["acceleration"]).autocast(), torch.inference_mode():
            run["latency_ms"] = latency_ms(run["one_step"], *run["inputs"], args.latency_repeats)
    base = next(iter(runs.values()))
    base_teacher, base_jdm = statistics.median(base["teacher"]), statistics.median(base["jdm"])
    result = {"profile": args.profile, "batch": args.batch or p.batch_size,
              "width_divisor": args.width_divisor,
              "rounds": args.rounds, "repeats": args.repeats, "machine": machine(), "settings": {}}
    for name, run in runs.items():
        teacher_s, jdm_s = statistics.median(run["teacher"]), statistics.median(run["jdm"])
        result["settings"][name] = {"teacher_step_s": teacher_s, "jdm_iteration_s": jdm_s,
                                    "teacher_speedup": base_teacher / teacher_s, "jdm_speedup": base_jdm / jdm_s,
                                    "jdm_over_teacher": jdm_s / teacher_s, "first_call_s": run["first_call_s"],
                                    "one_step_latency_ms": run["latency_ms"],
                                    **({"peak_memory_gib": run["peak_memory_gib"]} if "peak_memory_gib" in run else {})}
        print(f"{name:>16}: teacher step {teacher_s:.3f} s ({base_teacher / teacher_s:.2f}x the first), JDM iteration "
              f"{jdm_s:.3f} s ({base_jdm / jdm_s:.2f}x the first), iteration / teacher step {jdm_s / teacher_s:.2f}")
    shrunk = f"_widths-over-{args.width_divisor}" if args.width_divisor != 1 else ""
    out = write_result(f"acceleration_{args.profile}{shrunk}_{'-'.join(settings)}", result)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
