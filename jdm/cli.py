"""`jdm`: the stages DVC runs, and the commands a user types."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .env import set_offline_env

set_offline_env()  # before any tool that might phone home is imported

from .errors import UserError  # noqa: E402
from .config import PROFILES, ParamsError, load_params, profile_path  # noqa: E402

STAGES = ("data", "annotator", "conditions", "teacher", "evaluate-teacher")


def cmd_profile(args) -> None:
    """Make profile NAME the active params.yaml, refusing to overwrite edits that are in no profile."""
    src = profile_path(args.name)
    load_params(src)  # a profile file must itself be valid
    dst = Path(args.params)
    if dst.is_file() and not args.force:
        current = dst.read_text()
        if current == src.read_text():
            print(f"{dst} is already profile {args.name}")
            return
        if not any(profile_path(n).is_file() and profile_path(n).read_text() == current for n in PROFILES):
            raise ParamsError(f"{dst} has edits that are in no profile file; they would be lost. "
                              f"Save them, or rerun with --force (make run FORCE=1)")
    shutil.copyfile(src, dst)
    print(f"{dst} is now profile {args.name}")


def cmd_stage(args) -> None:
    from . import stages

    params = load_params(args.params)
    if args.command == "data":
        stages.run_data(params)
    elif args.command == "annotator":
        stages.run_annotator(params, args.name)
    elif args.command == "conditions":
        from .conditions import resolve_condition_class
        resolve_condition_class(args.name)  # an unknown name fails before any work
        stages.run_conditions(params, args.name)
    elif args.command == "teacher":
        stages.run_teacher(params)
    elif args.command == "evaluate-teacher":
        stages.run_evaluate_teacher(params)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jdm", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="make a profile (smoke, tiny, sd15) the active params.yaml")
    p.add_argument("name", help=f"one of: {', '.join(PROFILES)}")
    p.add_argument("--force", action="store_true", help="overwrite params.yaml even if it holds edits")
    p.set_defaults(func=cmd_profile)
    sub.add_parser("check", help="validate params.yaml and exit").set_defaults(
        func=lambda a: print(f"{a.params}: valid, profile {load_params(a.params).profile}"))
    for name in STAGES:
        p = sub.add_parser(name, help=f"run the `{name}` stage (DVC calls this)")
        if name == "annotator":
            p.add_argument("name", choices=("hed", "depth", "classifier"))
        if name == "conditions":
            p.add_argument("name", help="a built-in condition or a plugin 'package.module:Class'")
        p.set_defaults(func=cmd_stage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, FileNotFoundError) as err:
        print(f"jdm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
