"""Progress bars of the long command-line steps, one way everywhere.

``progress_bar(total, desc, progress)`` opens a ``tqdm`` bar on stderr, counted in volumes (or files):

- it is shown only when ``progress`` is true *and* stderr is a terminal (tqdm's ``disable=None``), so
  logs, CI output and captured test output never hold bar frames;
- while it is shown, console log handlers write through ``tqdm.write``
  (``tqdm.contrib.logging.logging_redirect_tqdm``: the root logger and every logger with its own console
  handler), so a log line appears above the bar instead of breaking it; each handler keeps its formatter,
  filters and level;
- ``advance(bar, name)`` moves it by one and shows the name of what just finished. Parallel steps call it
  as their jobs complete (``concurrent.futures.as_completed``), not in submission order, so one slow
  volume does not freeze the bar while the others finish.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["progress_bar", "advance"]


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def _console_loggers() -> list[logging.Logger]:
    """The root logger and every named logger holding a console handler of its own (e.g. ignite's)."""
    named = [lg for lg in list(logging.root.manager.loggerDict.values())
             if isinstance(lg, logging.Logger) and any(_is_console(h) for h in lg.handlers)]
    return [logging.root] + named


@contextlib.contextmanager
def _redirect_logging() -> Iterator[None]:
    loggers = _console_loggers()
    levels = [next((h.level for h in lg.handlers if _is_console(h)), logging.NOTSET) for lg in loggers]
    with logging_redirect_tqdm(loggers=loggers):
        for lg, level in zip(loggers, levels):
            lg.handlers[-1].setLevel(level)  # logging_redirect_tqdm appends its handler; keep the console's level
        yield


@contextlib.contextmanager
def progress_bar(total: int, desc: str, progress: bool = True, unit: str = "volume") -> Iterator[tqdm]:
    """A ``tqdm`` bar of ``total`` steps on stderr (module docstring); closed on exit, also on an error."""
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
               disable=None if progress else True)
    try:
        if bar.disable:
            yield bar
        else:
            with _redirect_logging():
                yield bar
    finally:
        bar.close()


def advance(bar: tqdm, name) -> None:
    """One more step done: ``name`` (what finished) shown after the bar, count + 1."""
    bar.set_postfix_str(str(name), refresh=False)
    bar.update(1)
