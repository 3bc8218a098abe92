"""Profiles: `profiles/tiny.yaml` is complete, `smoke.yaml` and `sd15.yaml` are overlays on it;
`jdm profile NAME` renders one into `params.yaml`. Also the params of an extra training seed
(`jdm seed-params`, seeds/dvc.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .config import PROFILES, Params, ParamsError, parse_params, read_yaml

BASE_PROFILE = "tiny"  # profiles/tiny.yaml is complete; the other profiles are overlays on it


def profile_path(name: str, root: str | os.PathLike = ".") -> Path:
    if name not in PROFILES:
        raise ParamsError(f"unknown profile {name!r}; available profiles: {', '.join(PROFILES)}")
    return Path(root) / "profiles" / f"{name}.yaml"


def _merge(base: dict, overlay: dict) -> dict:
    """`base` with `overlay`'s values: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def render_profile(name: str, root: str | os.PathLike = ".") -> str:
    """The params file of profile `name`: profiles/tiny.yaml as it is, or tiny with the overlay
    profiles/<name>.yaml merged in (only what differs is in an overlay)."""
    base = profile_path(BASE_PROFILE, root)
    if name == BASE_PROFILE:
        return base.read_text()
    path = profile_path(name, root)
    merged = _merge(read_yaml(base), read_yaml(path) or {})
    return (f"# profile {name}: profiles/{BASE_PROFILE}.yaml with the overlay profiles/{name}.yaml, rendered by "
            f"`jdm profile {name}`; the comments are in those two files\n" + yaml.safe_dump(merged, sort_keys=False))


def profile_params(name: str, root: str | os.PathLike = ".") -> Params:
    """The validated params of profile `name` (see `render_profile`)."""
    source = f"profile {name} ({profile_path(name, root)})"
    return parse_params(read_yaml(source, render_profile(name, root)), source)


def seed_params(path: str | os.PathLike, offset: int) -> str:
    """The params file `path` with `seed` moved by `offset`, as YAML: the params of one extra training
    seed (seeds/dvc.yaml), everything else the same. Validated like any params file."""
    if offset <= 0:
        raise ParamsError(f"seed offset must be a positive integer (got {offset}); offset 0 is params.yaml itself")
    raw = read_yaml(path)
    params = parse_params(raw, str(path))
    raw["seed"] = params.seed + offset
    return (f"# generated from {Path(path).name} by `jdm seed-params {offset}` (seeds/dvc.yaml): seed + {offset}, "
            f"nothing else changed; do not edit\n" + yaml.safe_dump(raw, sort_keys=False))
