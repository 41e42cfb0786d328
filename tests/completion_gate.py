"""Deterministic completion-order checks of the progress bars (``custom_components.progress``), no timing.

``held(fn, key, release)`` wraps a job function so that the job whose ``key`` matches waits until the file
``release`` exists; ``BarRecorder(release, others)`` stands in for ``tqdm`` and creates ``release`` once the
bar has shown every name in ``others``. With a pool that reports jobs as they complete, the held job is
released by the bar and shows last; with one that waits for results in submission order, the bar never
sees the others first and the held job runs only after ``TIMEOUT_S`` (a safety net so that a regression
fails the test's order assertion instead of hanging it). Pools must fork (Linux, Python 3.11's default),
so that worker processes see the wrapped function.
"""

from __future__ import annotations

import os
import time

TIMEOUT_S = 60.0


def held(fn, key, release):
    """``fn`` whose call for ``key(args) == True`` first waits for the file ``release`` (at most TIMEOUT_S)."""

    def wrapper(*args, **kwargs):
        if key(*args, **kwargs):
            deadline = time.monotonic() + TIMEOUT_S
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.01)
        return fn(*args, **kwargs)

    return wrapper


def bar_recorder(release, others):
    """A ``tqdm`` stand-in class; ``Bar.shown`` lists the names the bar showed, in order."""
    others = {str(o) for o in others}

    class Bar:
        shown: list[str] = []
        disable = True  # as tqdm is when stderr is not a terminal: no logging redirect

        def __init__(self, *args, **kwargs):
            self.total = kwargs.get("total")

        def set_postfix_str(self, s="", refresh=True):
            Bar.shown.append(str(s))

        def update(self, n=1):
            if others <= set(Bar.shown):
                open(release, "a").close()

        def close(self):
            pass

    return Bar
