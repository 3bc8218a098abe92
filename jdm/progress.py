"""Progress bars where a person is watching: tqdm on a terminal, nothing when the output is a log
(DVC, a Prefect flow run, CI), where the stages' step lines say how far they are."""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, initial: int = 0,
             enabled: bool = True) -> Iterable[T]:
    from tqdm.auto import tqdm

    # disable=None: tqdm's own test, off unless stderr is a terminal
    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=None if enabled else True, leave=False,
                dynamic_ncols=True)
