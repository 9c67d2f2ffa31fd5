"""Backoff policy: how long to wait before retry number n."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from celery_resilience.errors import ConfigurationError

Jitter = Literal["none", "full", "equal"]
_JITTERS = ("none", "full", "equal")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with a cap and optional jitter.

    The delay before retry ``n`` (``n`` from 0) is ``d = min(cap, base * factor**n)``
    seconds, then jitter: ``"none"`` gives ``d``, ``"full"`` a uniform value in
    ``[0, d]``, ``"equal"`` (default) a uniform value in ``[d/2, d]``.
    """

    base: float = 2.0
    factor: float = 2.0
    cap: float = 600.0
    jitter: Jitter = "equal"

    def __post_init__(self) -> None:
        for name in ("base", "factor", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigurationError(
                    f"Backoff {name}={value!r}: expected a number, got {type(value).__name__}"
                )
        if self.base < 0:
            raise ConfigurationError(f"Backoff base={self.base!r}: expected seconds >= 0")
        if self.factor < 1:
            raise ConfigurationError(f"Backoff factor={self.factor!r}: expected a number >= 1")
        if self.cap < 0:
            raise ConfigurationError(f"Backoff cap={self.cap!r}: expected seconds >= 0")
        if self.jitter not in _JITTERS:
            raise ConfigurationError(
                f"Backoff jitter={self.jitter!r}: expected one of {', '.join(_JITTERS)}"
            )

    def ceiling(self, n: int) -> float:
        """Return the delay before retry ``n`` before jitter, in seconds."""
        if n < 0:
            raise ValueError(f"retry number must be >= 0, got {n}")
        try:
            return float(min(self.cap, self.base * self.factor**n))
        except OverflowError:
            # factor**n overflows a float long after it passed any sane cap.
            return float(self.cap)

    def delay(self, n: int, rng: random.Random | None = None) -> float:
        """Return the delay before retry ``n`` in seconds, jitter applied."""
        d = self.ceiling(n)
        uniform = (rng or random).uniform
        if self.jitter == "full":
            return uniform(0.0, d)
        if self.jitter == "equal":
            return uniform(d / 2, d)
        return d
