"""Which code each DVC stage runs, and whether its `deps` say so.

For every stage of dvc.yaml, paper/dvc.yaml and seeds/dvc.yaml whose command is `jdm ...`, the command
line is parsed by jdm's own CLI with every stage function replaced by a recorder, so the function it
runs is the one `jdm` would run, not a table kept beside it. The code of that function is then read
off the source: the stage module's imports, the imports inside the function and inside the stage
helpers it calls, and every library module those import, transitively (imports inside functions
included: the library imports its heavy parts lazily). A stage's code deps must cover exactly that set:
a missing file means an edit reruns nothing, an extra one that an edit reruns too much. `jdm/cli.py`
(it only routes) and `jdm/env.py` (offline switches) are left out.

    python infra/stage_deps.py            # each stage whose deps differ, with what is missing or extra
    python infra/stage_deps.py --expect   # each stage's code deps as they should be written
    python infra/stage_deps.py --write    # rewrite the code deps of the dvc.yaml files (comments kept)
"""

from __future__ import annotations

import argparse
import ast
import shlex
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jdm"
DVC_FILES = ("dvc.yaml", "paper/dvc.yaml", "seeds/dvc.yaml")
NOT_STAGE_CODE = {"jdm/cli.py", "jdm/env.py"}


def _module_file(name: str) -> Path | None:
    """jdm.x.y -> jdm/x/y.py or jdm/x/y/__init__.py; None for a module outside the package."""
    if name != "jdm" and not name.startswith("jdm."):
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """The jdm modules imported anywhere under `node` (a `from x import y` may import submodule x.y)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for n in _walk_run_code(node):
        if isinstance(n, ast.Import):
            found.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.rsplit(".", n.level - 1)[0] if n.level > 1 else package
                target = f"{base}.{n.module}" if n.module else base
            else:
                target = n.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in n.names if _module_file(f"{target}.{a.name}"))
    return {m for m in found if _module_file(m)}


def _walk_run_code(node: ast.AST):
    """ast.walk, minus the `if TYPE_CHECKING:` blocks (imports for annotations only never run)."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        for child in ast.iter_child_nodes(n):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and "TYPE_CHECKING" in (getattr(test, "id", None), getattr(test, "attr", None)):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _with_parents(module: str) -> set[str]:
    """A module and the packages Python imports first (jdm.training.phases: jdm, jdm.training)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@lru_cache(maxsize=None)
def library_closure(module: str) -> frozenset[str]:
    """Files of `module` and of everything it imports, anywhere in it, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        for m in _with_parents(name) - seen:
            seen.add(m)
            path = _module_file(m)
            todo.extend(_imports(_tree(path), m, path.name == "__init__.py"))
    return frozenset(str(_module_file(m).relative_to(ROOT)) for m in seen)


def stage_code(module: str, function: str) -> set[str]:
    """The files stage function `module.function` runs: its module's top-level imports, the imports in
    the function and in the stage functions it calls (in its module or a sibling stage module), and
    the library behind all of them."""
    modules, seen, todo = set(), set(), [(module, function)]
    while todo:
        mod, fn = todo.pop()
        if (mod, fn) in seen:
            continue
        seen.add((mod, fn))
        path = _module_file(mod)
        tree = _tree(path)
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        modules |= _with_parents(mod) | set().union(*(_imports(n, mod, False) for n in top))
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        sibling = {a.asname or a.name: n.module for n in top if isinstance(n, ast.ImportFrom) and n.level == 1
                   for a in n.names}
        body = defs.get(fn)
        if body is None:  # a constant of a sibling module: its imports are counted above
            continue
        modules |= _imports(body, mod, False)
        for n in ast.walk(body):
            if isinstance(n, ast.Name):
                if n.id in defs and n.id != fn:
                    todo.append((mod, n.id))
                elif n.id in sibling:
                    todo.append((f"jdm.stages.{sibling[n.id]}", n.id))
    files = set()
    for m in modules:
        if m.startswith("jdm.stages"):
            files.add(str(_module_file(m).relative_to(ROOT)))
        else:
            files |= library_closure(m)
    return files - NOT_STAGE_CODE


class _Ran(Exception):
    pass


def command_code(cmd: str) -> set[str]:
    """The code files `jdm ...` (a stage's command) runs, found by letting jdm's CLI dispatch it."""
    import importlib
    import pkgutil

    import jdm.stages
    from jdm import cli

    argv = shlex.split(cmd)
    if argv[0] != "jdm":
        raise ValueError(f"not a jdm command: {cmd!r}")
    if argv[1] == "seed-params":
        return set(library_closure("jdm.profiles")) - NOT_STAGE_CODE
    ran = []
    saved = []
    for info in pkgutil.iter_modules(jdm.stages.__path__):
        module = importlib.import_module(f"jdm.stages.{info.name}")
        for name in dir(module):
            if name.startswith("run_") and getattr(getattr(module, name), "__module__", None) == module.__name__:
                saved.append((module, name, getattr(module, name)))

                def record(*args, _where=(module.__name__, name), **kwargs):
                    ran.append(_where)
                    raise _Ran
                setattr(module, name, record)
    try:
        try:
            cli.main(["--params", str(ROOT / "params.yaml"), *argv[1:]])
        except _Ran:
            pass
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
    if len(ran) != 1:
        raise RuntimeError(f"`{cmd}` ran {len(ran)} stage functions, expected 1")
    return stage_code(*ran[0])


def declared_code(deps: list[Path]) -> set[str]:
    """The jdm/*.py files a stage's deps cover (a folder dep covers every file under it)."""
    files = set()
    for dep in deps:
        dep = dep.resolve()
        if dep != PACKAGE and PACKAGE not in dep.parents:
            continue
        paths = dep.rglob("*.py") if dep.is_dir() else [dep]
        files |= {str(p.relative_to(ROOT)) for p in paths if p.suffix == ".py" and "__pycache__" not in p.parts}
    return files


def written_deps(files: set[str]) -> list[str]:
    """`files` as DVC deps: a folder where the set holds every file under it, else the files."""
    out, covered = [], set()
    folders = sorted({str(Path(f).parent) for f in files} - {"jdm"}, key=lambda d: d.count("/"))
    for folder in folders:
        under = {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
        if under <= files and not any(folder.startswith(c + "/") for c in out):
            out.append(folder)
            covered |= under
    return sorted(out + [f for f in files if f not in covered])


def stages() -> list[tuple[str, str, list[Path], Path]]:
    """(file:name, command, deps as absolute paths, working directory) of every stage whose command is
    `jdm ...`."""
    from dvc.repo import Repo

    found = []
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            cmd = stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd or [])
            if cmd.startswith("jdm "):
                found.append((f"{stage.relpath}:{stage.addressing.split(':')[-1]}", cmd,
                              [Path(d.fs_path) for d in stage.deps], Path(stage.wdir)))
    return found


def write() -> None:
    """Replace the literal jdm/ entries of each stage's deps by the code it runs (a `foreach` stage: what
    all its items run), keeping the other deps, their order and every comment."""
    import os

    from ruamel.yaml import YAML

    code: dict[tuple[str, str], set[str]] = {}
    wdirs: dict[tuple[str, str], Path] = {}
    for name, cmd, _, wdir in stages():
        file, _, stage = name.partition(":")
        key = (file, stage.partition("@")[0])
        code.setdefault(key, set()).update(command_code(cmd))
        wdirs[key] = wdir
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.preserve_quotes = True
    for file in DVC_FILES:
        path = ROOT / file
        doc = yaml.load(path.read_text())
        for stage_name, stage in doc["stages"].items():
            if (file, stage_name) not in code:
                continue
            body = stage.get("do", stage)
            wdir = wdirs[(file, stage_name)]
            kept = [d for d in body["deps"] if "${" in str(d) or not (wdir / str(d)).resolve().is_relative_to(PACKAGE)]
            new = [os.path.relpath(ROOT / d, wdir) for d in written_deps(code[(file, stage_name)])]
            body["deps"][:] = new + kept
        with open(path, "w") as f:
            yaml.dump(doc, f)


def mismatches() -> dict[str, tuple[set[str], set[str]]]:
    """stage -> (code it runs that its deps miss, code its deps list that it does not run)."""
    out = {}
    for name, cmd, deps, _ in stages():
        runs, declared = command_code(cmd), declared_code(deps)
        if runs != declared:
            out[name] = (runs - declared, declared - runs)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect", action="store_true", help="print each stage's code deps as they should be")
    parser.add_argument("--write", action="store_true", help="rewrite the code deps of the dvc.yaml files")
    args = parser.parse_args()
    if args.write:
        write()
    if args.expect:
        for name, cmd, _, _ in stages():
            print(f"{name}  ({cmd})")
            print("".join(f"      - {d}\n" for d in written_deps(command_code(cmd))))
        return 0
    bad = mismatches()
    for name, (missing, extra) in bad.items():
        print(f"{name}: missing {sorted(missing)}; extra {sorted(extra)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
