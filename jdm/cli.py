"""`jdm`: the stages DVC runs, and the commands a user types."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from .env import set_offline_env

set_offline_env()  # before any tool that might phone home is imported

from .errors import UserError  # noqa: E402
from .config import PROFILES, ParamsError, load_params  # noqa: E402
from .profiles import profile_params, profile_path, render_profile, seed_params  # noqa: E402
from .training.errors import TrainingStopped  # noqa: E402
from .variants import METHODS, TRAINED_BASELINES  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what `jdm sample --out` writes
STAGES = ("data", "annotator", "judge", "conditions", "teacher", "evaluate-teacher", "warmup", "extend", "controlnet",
          "reference")

# the commands that train (or sample) data-parallel under `accelerate launch` (docs/operations.md, "Several
# processes"), and the variable that makes them launch themselves so (a GPU work pool's job environment sets it)
DATA_PARALLEL = ("teacher", "controlnet", "warmup", "extend", "baseline", "text-to-image", "reference", "evaluate")
LAUNCH_CONFIG = "JDM_ACCELERATE_CONFIG"


def relaunch(argv: list[str], command: str) -> int | None:
    """With JDM_ACCELERATE_CONFIG naming an accelerate config, a training command starts itself again as
    `accelerate launch --config_file <it> -m jdm.cli ...` and returns its exit status: the `jdm warmup` DVC
    runs becomes one process per GPU with no change to dvc.yaml. None: run here (another command, no
    variable, or already a launched process, which torch elastic marks with LOCAL_RANK)."""
    config = os.environ.get(LAUNCH_CONFIG)
    if not config or command not in DATA_PARALLEL or "LOCAL_RANK" in os.environ:
        return None
    if not Path(config).is_file():
        raise UserError(f"{LAUNCH_CONFIG}={config!r} is not a file: name an accelerate config file "
                        f"(infra/accelerate/*.yaml), or unset it to train in this process")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "-m", "jdm.cli", *argv]
    return subprocess.run(launch).returncode


def cmd_profile(args: argparse.Namespace) -> None:
    """Make profile NAME the active params.yaml, refusing to overwrite edits that are in no profile."""
    profile_params(args.name)  # a profile must itself be valid
    text = render_profile(args.name)
    dst = Path(args.params)
    if dst.is_file() and not args.force:
        current = dst.read_text()
        if current == text:
            print(f"{dst} is already profile {args.name}")
            return
        if not any(profile_path(n).is_file() and render_profile(n) == current for n in PROFILES):
            raise ParamsError(f"{dst} has edits that are in no profile file; they would be lost. "
                              f"Save them, or rerun with --force (make run FORCE=1)")
    dst.write_text(text)
    print(f"{dst} is now profile {args.name}")


def cmd_seed_params(args: argparse.Namespace) -> None:
    """Write the params of extra training seed `offset` (seeds/dvc.yaml's first stage)."""
    out = Path(args.out)
    text = seed_params(args.params, args.offset)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"{out}: seed + {args.offset}")


def cmd_stage(args: argparse.Namespace) -> None:
    from .stages import baselines, evaluation, foundation, phases, report, teacher, text_to_image
    from .variants import TEXT_ROWS, variant_phase

    params = load_params(args.params)
    if args.command == "data":
        foundation.run_data(params)
    elif args.command == "annotator":
        foundation.run_annotator(params, args.name)
    elif args.command == "judge":
        foundation.run_judge(params, args.name)
    elif args.command == "conditions":
        from .conditions import resolve_condition_class
        resolve_condition_class(args.name)  # an unknown name fails before any work
        foundation.run_conditions(params, args.name)
    elif args.command == "teacher":
        teacher.run_teacher(params)
    elif args.command == "evaluate-teacher":
        evaluation.run_evaluate_teacher(params)
    elif args.command == "reference":
        evaluation.run_reference(params)
    elif args.command == "report":
        report.run_report(params, args.methods.split(","), args.conditions.split(","), Path(args.out))
    elif args.command == "reward":
        text_to_image.run_reward(params, args.which)
    elif args.command == "seeds-report":
        report.run_seeds_report(params, [int(k) for k in args.seeds.split(",")], Path(args.out))
    elif args.command == "guide":
        text_to_image.run_guide(params)
    elif args.command == "text-to-image":
        text_to_image.run_text_to_image(params, args.variant)
    elif args.command == "evaluate-text-to-image":
        text_to_image.run_evaluate_text_to_image(params, args.methods.split(",") if args.methods else list(TEXT_ROWS))
    else:
        from .conditions import resolve_condition_class
        name = getattr(args, "name", None) or params.warmup.condition
        resolve_condition_class(name)  # an unknown name fails before any work
        if args.command in ("warmup", "extend"):
            phases.run_jdm_phase(params, name, args.command)
        elif args.command == "controlnet":
            baselines.run_controlnet_baseline(params, name, "controlnet-50")
        elif args.command == "evaluate":
            evaluation.run_evaluate(params, args.methods.split(","), name)
        elif args.method == "denoising":
            baselines.run_controlnet_baseline(params, name, "denoising")
        else:
            phases.run_jdm_phase(params, name, variant_phase(args.method, name, params.warmup.condition), args.method)


def cmd_sample(args: argparse.Namespace) -> None:
    """One-step generation: prompt + one or more control maps -> image (NFE 1)."""
    import torch

    from .pipeline import read_control

    if len(args.condition) != len(args.control):
        raise UserError(f"give one --control per --condition (got {len(args.condition)} conditions, "
                        f"{len(args.control)} control maps)")
    out = _image_out_path(args.out)
    pipe = _load_pipeline(args.models, args.condition)
    nets = pipe.controlnets  # each map read as the channels its ControlNet takes
    controls = {c: read_control(f, channels=nets[c].config.conditioning_channels if c in nets else None)
                for c, f in zip(args.condition, args.control)}
    image = pipe(args.prompt, controls, generator=torch.Generator().manual_seed(args.seed)).images[0]
    try:
        image.save(out)
    except OSError as err:
        raise UserError(f"cannot write --out {args.out!r} ({err})") from None
    print(f"wrote {out} ({'+'.join(args.condition)}, 1 network evaluation)")


def _load_pipeline(models: str, conditions: list[str]):
    """A folder `jdm export` wrote (model_index.json), or the training stages' folders (generator/ and
    controlnet-<condition>/)."""
    from .pipeline import OneStepControlPipeline

    if (Path(models) / "model_index.json").is_file():
        return OneStepControlPipeline.from_pretrained(models)
    return OneStepControlPipeline.from_workspace(models, conditions)


EXPORTED_METRICS = ("fid_inception", "kid_inception", "consistency", "prompt_accuracy", "num_samples")


def cmd_export(args: argparse.Namespace) -> None:
    """The trained generator and the named conditions' ControlNets as one diffusers folder with a model card."""
    import json

    from .pipeline import OneStepControlPipeline

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {args.out!r} is not empty; give a new folder (nothing was written)")
    pipe = OneStepControlPipeline.from_workspace(args.models, args.condition)
    trained_on = None
    if Path(args.params).is_file():
        p = load_params(args.params)
        trained_on = (f"Profile `{p.profile}` ({args.params} when exported): data `{p.data.source}` at {p.data.image_size} px, "
                      f"text encoder `{p.text_encoder.kind}`; warm-up {p.warmup.steps} iterations on {p.warmup.condition}, "
                      f"each further condition {p.extend.steps} iterations, batch {p.jdm.batch_size}.")
    metrics = {}
    for c in pipe.conditions:
        scores = Path(args.metrics) / f"jdm-{c}.json"
        if scores.is_file():
            row = json.loads(scores.read_text())
            metrics[c] = {k: row[k] for k in EXPORTED_METRICS if k in row}
    pipe.save_pretrained(out, trained_on=trained_on, metrics=metrics)
    print(f"wrote {out}: conditions {', '.join(pipe.conditions)}; load it with OneStepControlPipeline.from_pretrained")


def _image_out_path(out: str) -> Path:
    """`--out` checked before any work: an image file of a format Pillow writes; its folder is made."""
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out!r} is a directory; give an image file path, e.g. {str(path / 'sample.png')!r}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--out {out!r} has suffix {path.suffix or '(none)'!r}; allowed: {', '.join(IMAGE_SUFFIXES)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot make the folder of --out {out!r} ({err})") from None
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jdm", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="DEBUG",
                          help="show debug messages too (default: JDM_LOG_LEVEL, else INFO)")
    loudness.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="WARNING",
                          help="show warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="make a profile (smoke, tiny, sd15) the active params.yaml")
    p.add_argument("name", help=f"one of: {', '.join(PROFILES)}")
    p.add_argument("--force", action="store_true", help="overwrite params.yaml even if it holds edits")
    p.set_defaults(func=cmd_profile)
    sub.add_parser("check", help="validate params.yaml and exit").set_defaults(
        func=lambda a: print(f"{a.params}: valid, profile {load_params(a.params).profile}"))
    p = sub.add_parser("seed-params", help="write the params of an extra training seed (seeds/dvc.yaml calls this)")
    p.add_argument("offset", type=int, help="added to params.yaml's seed (1, 2, ...; make run's is 0)")
    p.add_argument("--out", required=True, help="the params file to write, e.g. seeds/1/params.yaml")
    p.set_defaults(func=cmd_seed_params)
    for name in STAGES:
        p = sub.add_parser(name, help=f"run the `{name}` stage (DVC calls this)")
        if name == "annotator":
            p.add_argument("name", choices=("hed", "depth", "classifier"))
        if name == "judge":
            p.add_argument("name", choices=("depth",), help="the judge to train (the hed judge has no weights)")
        if name in ("conditions", "extend", "controlnet"):
            p.add_argument("name", help="a built-in condition or a plugin 'package.module:Class'")
        p.set_defaults(func=cmd_stage)
    p = sub.add_parser("baseline", help="train a baseline or ablation of the paper table (paper/dvc.yaml calls this)")
    p.add_argument("method", choices=TRAINED_BASELINES)
    p.add_argument("name", nargs="?", help="the condition (default warmup.condition: di's and wo-modelling's own warm-up)")
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("evaluate", help="score methods on one condition for the comparison table")
    p.add_argument("name", help="the condition")
    p.add_argument("--methods", default="jdm,controlnet-50",
                   help="comma-separated: " + ", ".join(METHODS))
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("report", help="write the comparison table and sample grids (Markdown and HTML)")
    p.add_argument("--methods", default="jdm,controlnet-50")
    p.add_argument("--conditions", default="canny,hed,depth,sr")
    p.add_argument("--out", default="reports/main")
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("seeds-report", help="the headline rows across training seeds: mean and std, and which "
                                             "claims hold on every seed (seeds/dvc.yaml calls this)")
    p.add_argument("--seeds", default="1,2", help="the extra seeds' offsets, beside make run's (0)")
    p.add_argument("--out", default="reports/seeds")
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("reward", help="train a reward stand-in for human-feedback learning (paper/dvc.yaml calls this)")
    p.add_argument("which", choices=("train", "heldout"), help="train: gives HFL its gradient; heldout: only scores")
    p.set_defaults(func=cmd_stage)
    sub.add_parser("guide", help="decoupled CFG's guidance model: the teacher trained further, or the pretrained "
                                 "pipeline guide.pretrained names").set_defaults(func=cmd_stage)
    p = sub.add_parser("text-to-image", help="train a one-step text-to-image variant of the paper's Table 3")
    p.add_argument("variant", help="di, coupled-cfg, decoupled-cfg, hfl or hfl-on-x")
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("evaluate-text-to-image", help="score Table 3's rows and write reports/text-to-image")
    p.add_argument("--methods", help="comma-separated rows (default: all): teacher, di, coupled-cfg, hfl, "
                                     "decoupled-cfg, hfl-on-x")
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("sample", help="one-step controllable generation from a trained generator")
    p.add_argument("--condition", action="append", required=True,
                   help="condition of the control map (repeat with --control for several controls)")
    p.add_argument("--control", action="append", required=True, help="control map image (PNG), one per --condition")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="output image path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="models/jdm",
                   help="folder with generator/ (from the warm-up) and controlnet-<condition>/ (from extensions), "
                        "or a folder `jdm export` wrote")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("export", help="the generator and ControlNets as one diffusers pipeline folder with a model card")
    p.add_argument("--condition", action="append", required=True, help="a condition whose ControlNet goes in (repeatable)")
    p.add_argument("--out", required=True, help="a new folder (model_index.json, one subfolder per module, README.md)")
    p.add_argument("--models", default="models/jdm", help="folder with generator/ and controlnet-<condition>/")
    p.add_argument("--metrics", default="metrics/eval", help="where jdm-<condition>.json scores are read for the card")
    p.set_defaults(func=cmd_export)
    return parser


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record comes (a test's capture replaces it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname}: {text}"


def configure_logging(level: str | None = None) -> None:
    """The library's messages on stdout, once per process: progress and results as plain lines, warnings
    and errors with their level; `level` (the CLI's -v/-q), else JDM_LOG_LEVEL, else INFO sets what is shown."""
    import os

    level = (level or os.environ.get("JDM_LOG_LEVEL", "INFO")).upper()
    if level not in LOG_LEVELS:
        raise UserError(f"JDM_LOG_LEVEL={level!r}; allowed: {', '.join(LOG_LEVELS)}")
    package = logging.getLogger("jdm")
    package.setLevel(level)
    if not any(isinstance(h, _StdoutHandler) for h in package.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        package.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level)
        status = relaunch(sys.argv[1:] if argv is None else argv, args.command)
        if status is not None:
            return status
        args.func(args)
    except (UserError, FileNotFoundError, ConnectionError, TrainingStopped) as err:
        print(f"jdm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
