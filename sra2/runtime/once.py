"""Failures of monitoring, reported once: a progress report or a picture that fails once tends to
fail at every call, and the work it watches must go on, so the first failure is said and the rest
are dropped."""

from __future__ import annotations

import functools
from typing import Callable


class WarnOnce:
    """``warn(text)`` the first time it is called; later calls do nothing (:attr:`said` tells)."""

    def __init__(self, warn: Callable[[str], None]):
        self.warn, self.said = warn, False

    def __call__(self, text: str) -> None:
        if not self.said:
            self.said = True
            self.warn(text)


def harmless(fn: Callable, warn: WarnOnce, what: str) -> Callable:
    """``fn``, whose exceptions are reported through ``warn`` (once) and otherwise ignored: it
    returns None when ``fn`` fails. ``what`` names what failed ("progress reporting")."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the work goes on
            warn(f"{what} failed ({type(e).__name__}: {e}); the work goes on without it")
            return None

    return call
