"""Emit of long operations: a bar on a terminal, plain lines in logs (CI).

Used for model conversion, simulation rounds and ledger audits. On a TTY the bar is
tqdm's (with its rate and ETA); elsewhere each finished step prints one line such as
``[rounds] 2/4 done, 31 s elapsed, about 31 s left``, which reads well in CI logs and
never fills them with carriage returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")
Emit = Callable[[str], Any]


def is_terminal(stream: TextIO | None = None) -> bool:
    """True when `stream` (default stderr) is an interactive terminal."""
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class Tracker:
    """`total` steps of the operation `what`; call `advance()` after each.

    Parameters
    ----------
    total : int
        Number of steps.
    what : str
        Short name of the operation, e.g. ``"rounds"``.
    emit : callable, optional
        Receives the plain progress lines (default: print to stderr).
    bar : bool, optional
        Force the bar on or off (default: on when stderr is a terminal).
    """

    def __init__(self, total: int, what: str, emit: Emit | None = None,
                 bar: bool | None = None) -> None:
        self.total, self.what, self.done = total, what, 0
        self._emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
        self._start = time.monotonic()
        self._bar: Any = None
        if is_terminal() if bar is None else bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=what, file=sys.stderr, leave=True,
                             dynamic_ncols=True)

    def advance(self, note: str = "") -> None:
        """One more step finished (`note`: what it was, shown with the line / bar)."""
        self.done += 1
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(1)
            return
        elapsed = time.monotonic() - self._start
        left = elapsed / self.done * (self.total - self.done)
        text = f"[{self.what}] {self.done}/{self.total} done"
        if note:
            text += f" ({note})"
        text += f", {elapsed:.0f} s elapsed"
        if self.done < self.total:
            text += f", about {left:.0f} s left"
        self._emit(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], what: str, total: int | None = None, emit: Emit | None = None,
          bar: bool | None = None) -> Iterator[T]:
    """Yield `items`, reporting progress after each one (see `Tracker`)."""
    seq = list(items) if total is None else items
    count = len(seq) if isinstance(seq, list) else int(total or 0)
    with Tracker(count, what, emit, bar) as tracker:
        for item in seq:
            yield item
            tracker.advance()
