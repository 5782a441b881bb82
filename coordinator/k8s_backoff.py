"""Bounded exponential backoff with full jitter, shared by the Kubernetes watch loops.

Pure: it computes delays; the loops do the waiting (on their stop event, so stopping is never
delayed by a backoff)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackoffSettings:
    """How a loop backs off after consecutive failures."""

    initial_seconds: float = 0.5
    """Upper bound of the first delay, seconds."""
    max_seconds: float = 30.0
    """Upper bound of any delay, seconds: a recovered API server is noticed within this."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_seconds <= self.max_seconds:
            raise ValueError(
                "backoff needs 0 < initial_seconds <= max_seconds, got "
                f"{self.initial_seconds} and {self.max_seconds}"
            )


@dataclass
class Backoff:
    settings: BackoffSettings
    failures: int = 0
    _random: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """The delay before the next attempt after one more failure, seconds. Full jitter: many
        clients of one API server must not retry in step after it comes back."""
        ceiling = min(
            self.settings.max_seconds, self.settings.initial_seconds * 2 ** min(self.failures, 30)
        )
        self.failures += 1
        return self._random.uniform(0, ceiling)

    def reset(self) -> None:
        self.failures = 0
