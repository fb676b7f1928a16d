"""The training methods a run may have on, in a fixed order: their loss columns, their draws and
their heads' initialisation follow it. A method is added here and nowhere else in the code that
runs it; a test can add one for its own duration (:func:`added`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from sra2.config.params import Config
from sra2.methods import align, reg, repa, sra
from sra2.methods.method import Method
from sra2.model.networks import MODELS

METHODS: list[Method] = [align.METHOD, sra.METHOD, repa.METHOD, reg.METHOD]


def active(cfg: Config) -> list[Method]:
    """The methods ``cfg`` has on, in registry order."""
    return [m for m in METHODS if m.on(cfg)]


def describe(cfg: Config) -> str:
    """The methods a run trains with, in words: the methods on and their settings."""
    return " + ".join(m.describe(cfg) for m in active(cfg)) or "no alignment (vanilla SiT)"


def titles(cfg: Config, none: str = "vanilla") -> str:
    """The methods on, by name: "SRA 2 + REPA", or ``none``."""
    return " + ".join(m.title for m in active(cfg)) or none


def problems(cfg: Config) -> list[str]:
    """What is wrong with the methods on: the blocks they read that model.name lacks (one place
    checks a block range), and each method's own checks across sections; nothing while model.name
    itself is unknown (sra2.methods.checks names that)."""
    if cfg.model.name not in MODELS:
        return []
    depth = MODELS[cfg.model.name].keywords["depth"]
    found = []
    for m in active(cfg):
        found += [f"{key}: must be in [1, {depth}], the blocks of {cfg.model.name} (got {block!r})"
                  for key, block in m.blocks(cfg).items() if not 1 <= block <= depth]
        found += m.problems(cfg)
    return found


def needs_images(cfg: Config) -> bool:
    return any(m.needs_images(cfg) for m in active(cfg))


@contextlib.contextmanager
def added(method: Method) -> Iterator[Method]:
    """``method`` registered (last) for the body of the with-statement."""
    METHODS.append(method)
    try:
        yield method
    finally:
        METHODS.remove(method)
