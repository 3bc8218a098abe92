"""Conditions are plugins: a name, an exact `extract`, a differentiable `log_likelihood`, a channel count.

Built-ins: canny, hed, depth, sr. A user's own condition is a `Condition` subclass named by import
path (`my_pkg.my_module:MyCondition`): nothing in this repository changes to add it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from .base import Condition
from .builtin import BUILTIN

if TYPE_CHECKING:
    from ..config import Params

__all__ = ["Condition", "BUILTIN", "available", "condition_slug", "resolve_condition_class", "load_condition"]


def available() -> str:
    return ", ".join(sorted(BUILTIN)) + ", or a plugin as 'package.module:ClassName'"


def condition_slug(name: str) -> str:
    """A folder-safe name: built-ins as they are, plugins 'pkg.mod:Cls' as 'pkg.mod-Cls'."""
    return name.replace(":", "-")


def resolve_condition_class(name: str) -> type[Condition]:
    """The class for a built-in name or an explicit import path; nothing else is ever imported."""
    if not isinstance(name, str) or not name:
        raise UserError(f"condition must be a non-empty string; available conditions: {available()}")
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise UserError(f"unknown condition {name!r}; available conditions: {available()}")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import failure of user code is reported the same way
        raise UserError(f"condition plugin {name!r}: module {module_name!r} does not import "
                        f"({type(err).__name__}: {err})") from err
    cls = getattr(module, attr, None)
    if cls is None:
        raise UserError(f"condition plugin {name!r}: module {module_name!r} has no attribute {attr!r}")
    missing = [m for m in ("extract", "log_likelihood") if not callable(getattr(cls, m, None))]
    if not isinstance(cls, type) or missing or not isinstance(getattr(cls, "channels", None), int):
        raise UserError(f"condition plugin {name!r} lacks the Condition interface: it needs a class with an int "
                         f"`channels`, `extract(images)` and `log_likelihood(x, c)` (subclass jdm.conditions.Condition)"
                         + (f"; missing {', '.join(missing)}" if missing else ""))
    if cls.channels < 1:
        raise UserError(f"condition plugin {name!r} has channels = {cls.channels}; allowed: an int >= 1")
    return cls


def load_condition(name: str, params: Params | None = None, models_dir: str | Path = "models") -> Condition:
    """An instance ready to use; built-ins that need an annotator load it from `models_dir/annotators`."""
    cls = resolve_condition_class(name)
    cond = cls.create(params, Path(models_dir)) if hasattr(cls, "create") else cls()
    cond.name = name if ":" in name else cond.name
    return cond
