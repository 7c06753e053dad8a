"""The named profiles of ``perf/run`` and the thresholds each one is judged by.

This module does not import locust (locust patches the standard library with gevent when it
is imported), so the runner and the report can read profiles and thresholds freely. The
load shapes that carry out a profile live in ``perf.shapes``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    """What a run must achieve to pass. Latencies in milliseconds, ``None`` means not judged."""

    rate_tolerance: float | None = 0.05  # achieved rate within +-5 % of the target
    max_failures: int = 0
    post_p95_ms: float | None = 50.0
    post_p99_ms: float | None = 150.0
    e2e_p95_ms: float | None = 250.0
    exactly_once: bool = True  # every accepted notification reached every subscriber once
    min_max_rate: float | None = None  # for ``max``: the last rate that held must reach this

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    """A profile: which shape class runs it, with which knobs, judged by which thresholds."""

    name: str
    shape: str  # class name in perf.shapes
    knobs: dict[str, float] = field(default_factory=dict)
    thresholds: Thresholds = Thresholds()
    description: str = ""


def _tier(rate: int) -> Profile:
    return Profile(
        name=f"tier-{rate}", shape="ConstantRate",
        knobs={"rate": rate, "ramp_s": 5, "hold_s": 60},
        description=f"constant arrival rate of {rate} notifications/s, held for hold_s",
    )


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        _tier(50),
        _tier(100),
        _tier(200),
        Profile(
            name="ramp", shape="StepUsers",
            knobs={"first_users": 1, "last_users": 100, "step_users": 10, "step_s": 15},
            # A closed model finds the saturation point; latency there is not a verdict.
            thresholds=Thresholds(
                rate_tolerance=None, post_p95_ms=None, post_p99_ms=None, e2e_p95_ms=None,
            ),
            description="the incumbent's method: 1 -> 100 users without think time, stepwise",
        ),
        Profile(
            name="max", shape="RaiseRate",
            knobs={
                "start_rate": 100, "step_rate": 100, "step_s": 15, "ceiling_rate": 3000,
                "confirm_steps": 1,
            },
            thresholds=Thresholds(min_max_rate=1000.0),
            description=(
                "raise the arrival rate step by step until a step misses the tier "
                "thresholds (after confirm_steps retries); report the last rate that held"
            ),
        ),
    )
}


def profile_named(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(PROFILES)
        raise ValueError(f"profile must be one of {known}, but got {name!r}") from None
