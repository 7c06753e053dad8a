"""Load shapes for ``perf/run``: small locust ``LoadTestShape`` classes with named knobs.

Two workload models are used, on purpose:

- ``ConstantRate`` and ``RaiseRate`` are *open* models: a shared pacer hands out send slots
  at the target arrival rate, and a pool of users (sized from the rate) takes them. A slow
  answer does not slow the arrivals down, so an overloaded server shows up as latency,
  errors or a missed rate instead of being hidden by politely waiting clients.
- ``StepUsers`` is the incumbent's *closed* model: N users without think time, N raised
  stepwise. It finds the saturation throughput; its latencies are not a verdict.

Every shape records its phases (wall-clock start and end, the target) in ``phases.json`` so
the report can judge each phase from the raw publish and arrival logs.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locust import LoadTestShape

from perf.profiles import Thresholds, profile_named
from perf.stats import percentile


@dataclass
class Meter:
    """What the users report back: one entry per publish, kept in completion order."""

    done_at: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)
    accepted_at: dict[str, float] = field(default_factory=dict)
    # (received_at, end-to-end ms) of every arrival the sink reported, in arrival order.
    e2e: list[tuple[float, float]] = field(default_factory=list)
    arrivals_seen: int = 0

    def record(self, key: str, done_at: float, latency_ms: float, ok: bool) -> None:
        if ok:
            self.done_at.append(done_at)
            self.latency_ms.append(latency_ms)
            self.accepted_at[key] = done_at
        else:
            self.failed_at.append(done_at)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Rate, POST latency, failures and end-to-end latency between two wall times."""
        low = bisect.bisect_left(self.done_at, start)
        high = bisect.bisect_left(self.done_at, end)
        latencies = self.latency_ms[low:high]
        failures = sum(1 for moment in self.failed_at if start <= moment < end)
        e2e = [ms for received_at, ms in self.e2e if start <= received_at < end]
        span = max(end - start, 1e-9)
        return {
            "accepted": len(latencies),
            "failures": failures,
            "rate": len(latencies) / span,
            "post_p50_ms": percentile(latencies, 0.50),
            "post_p95_ms": percentile(latencies, 0.95),
            "post_p99_ms": percentile(latencies, 0.99),
            "e2e_p95_ms": percentile(e2e, 0.95),
            "e2e_count": len(e2e),
        }


class KoerierShape(LoadTestShape):
    """Common machinery: phases, the pacer, sink polling, live status and a failure stop."""

    abstract = True

    #: Users per unit of arrival rate: 0.25 means enough users for 250 ms of latency.
    users_per_rate = 0.25
    #: Users kept in the pool however low the rate.
    min_users = 8
    #: Stop the run when more than this share of publishes failed (after ``min_requests``).
    max_failure_ratio = 0.05
    min_requests = 200
    #: Slots older than this are dropped and counted as missed instead of sent in a burst.
    max_lag_s = 1.0
    #: Time at the end without new sends, so requests in flight complete and are logged.
    cooldown_s = 2.0
    #: How often the sink is asked for new arrivals and the live status is written.
    poll_s = 2.0

    profile_name = ""
    thresholds = Thresholds()

    def __init__(self) -> None:
        super().__init__()
        self.meter = Meter()
        self.phases: list[dict[str, Any]] = []
        self.current_rate = 0.0  # 0 = closed model, users send without waiting
        self.closed_model = False
        self.missed_slots = 0
        self.late_sends = 0
        self.stop_reason = ""
        self._next_slot = 0.0
        self._last_poll = 0.0
        self._cooldown_until = 0.0
        self.out = Path(os.environ.get("PERF_OUT", "."))
        self.sink_url = os.environ.get("PERF_SINK_URL", "")
        self.sink_ok = True

    # -- pacing -------------------------------------------------------------------------
    def next_slot(self) -> float:
        """Wall time at which the calling user should send; reserves that slot."""
        now = time.time()
        if self.closed_model:
            return now
        if self.current_rate <= 0:
            return now + 0.5
        interval = 1.0 / self.current_rate
        if not self._next_slot:
            self._next_slot = now
        if self._next_slot < now - self.max_lag_s:
            # The users could not keep up (all busy, or the generator starved of CPU): drop
            # the missed slots and say so, instead of firing them all at once.
            self.missed_slots += int((now - self._next_slot) / interval)
            self._next_slot = now
        slot = max(self._next_slot, now - self.max_lag_s)
        self._next_slot = slot + interval
        return slot

    def pool_size(self, rate: float) -> int:
        return max(self.min_users, math.ceil(rate * self.users_per_rate))

    # -- phases -------------------------------------------------------------------------
    def begin_phase(self, name: str, target_rate: float | None, users: int | None) -> None:
        now = time.time()
        if self.phases and self.phases[-1]["end"] is None:
            self.phases[-1]["end"] = now
        self.phases.append({
            "name": name, "start": now, "end": None,
            "target_rate": target_rate, "users": users,
        })

    def end_phases(self, reason: str) -> None:
        if self.phases and self.phases[-1]["end"] is None:
            self.phases[-1]["end"] = time.time()
        self.stop_reason = self.stop_reason or reason
        self.write_status(final=True)

    # -- watching -----------------------------------------------------------------------
    def failing_badly(self) -> bool:
        failures = len(self.meter.failed_at)
        total = failures + len(self.meter.done_at)
        return total >= self.min_requests and failures / total > self.max_failure_ratio

    def poll(self) -> None:
        now = time.time()
        if now - self._last_poll < self.poll_s:
            return
        self._last_poll = now
        self.poll_sink()
        self.write_status(final=False)

    def poll_sink(self) -> None:
        if not self.sink_url or not self.sink_ok:
            return
        url = f"{self.sink_url}/_sink/arrivals?from={self.meter.arrivals_seen}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
                self.meter.arrivals_seen = int(response.headers["X-Next"])
        except OSError:
            # The runner reports on the dumped arrivals anyway; live e2e is a convenience.
            self.sink_ok = False
            return
        accepted_at = self.meter.accepted_at
        for line in body.splitlines():
            key, received = line.split(" ")
            published = accepted_at.get(key)
            if published is not None:
                moment = float(received)
                self.meter.e2e.append((moment, (moment - published) * 1000.0))

    def write_status(self, final: bool) -> None:
        now = time.time()
        recent = self.meter.window(now - 5.0, now)
        status = {
            "profile": self.profile_name, "time": now, "final": final,
            "phase": self.phases[-1]["name"] if self.phases else "",
            "target_rate": self.current_rate or None,
            "users": self.runner.user_count if self.runner else 0,
            "accepted": len(self.meter.done_at), "failures": len(self.meter.failed_at),
            "missed_slots": self.missed_slots, "late_sends": self.late_sends,
            "recent": recent, "stop_reason": self.stop_reason,
        }
        self._write_json("live.json", status)
        self._write_json("phases.json", {
            "profile": self.profile_name, "stop_reason": self.stop_reason,
            "missed_slots": self.missed_slots, "late_sends": self.late_sends,
            "phases": self.phases,
        })

    def _write_json(self, name: str, payload: dict[str, Any]) -> None:
        target = self.out / name
        scratch = target.with_suffix(".tmp")
        scratch.write_text(json.dumps(payload, indent=1))
        scratch.replace(target)


class ConstantRate(KoerierShape):
    """A tier: ramp up to ``rate`` over ``ramp_s``, hold it for ``hold_s``, then stop."""

    abstract = True
    rate = 50.0
    ramp_s = 5.0
    hold_s = 60.0

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        self.poll()
        if self.failing_badly():
            self.stop_reason = "failure ratio above max_failure_ratio"
            return self._finish(elapsed)
        users = self.pool_size(self.rate)
        if elapsed < self.ramp_s:
            if not self.phases:
                self.begin_phase("ramp", None, users)
            # Never below 10 % so the first second already exercises every path.
            self.current_rate = self.rate * max(elapsed / self.ramp_s, 0.1)
            return users, users
        if elapsed < self.ramp_s + self.hold_s:
            if self.phases[-1]["name"] != "hold":
                self.begin_phase("hold", self.rate, users)
            self.current_rate = self.rate
            return users, users
        return self._finish(elapsed)

    def _finish(self, elapsed: float) -> tuple[int, float] | None:
        if self.current_rate > 0:
            self.current_rate = 0.0
            self.end_phases("completed")
            self._cooldown_until = elapsed + self.cooldown_s
        if elapsed < self._cooldown_until:
            return self.runner.user_count if self.runner else 0, 100
        return None


class StepUsers(KoerierShape):
    """The closed model: ``first_users``, then multiples of ``step_users`` up to
    ``last_users``, each for ``step_s``; users send again as soon as they have an answer."""

    abstract = True
    first_users = 1
    last_users = 100
    step_users = 10
    step_s = 15.0

    def __init__(self) -> None:
        super().__init__()
        self.closed_model = True
        self.steps = [int(self.first_users)] + list(
            range(int(self.step_users), int(self.last_users) + 1, int(self.step_users))
        )

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        self.poll()
        index = int(elapsed // self.step_s)
        if self.failing_badly():
            self.stop_reason = "failure ratio above max_failure_ratio"
            index = len(self.steps)
        if index >= len(self.steps):
            if self.phases and self.phases[-1]["end"] is None:
                self.end_phases("completed")
            return None
        users = self.steps[index]
        if len(self.phases) <= index:
            self.begin_phase(f"{users}-users", None, users)
        return users, users


class RaiseRate(KoerierShape):
    """``max``: start at ``start_rate``, add ``step_rate`` every ``step_s`` while each step
    holds the thresholds; a failed step is tried again ``confirm_steps`` times (the machine
    is shared, one noisy step should not end the search). ``settle_s`` at the start of a
    step is not judged: the backlog of the previous rate drains there."""

    abstract = True
    start_rate = 100.0
    step_rate = 100.0
    step_s = 15.0
    settle_s = 3.0
    ceiling_rate = 3000.0
    confirm_steps = 1

    def __init__(self) -> None:
        super().__init__()
        self.rate = float(self.start_rate)
        self.step_started = 0.0
        self.retries = 0
        self.last_held: float | None = None
        self.finished = False

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        if self.finished:
            self.poll()
            if elapsed >= self._cooldown_until:
                return None
            return self.runner.user_count if self.runner else 0, 100
        self.poll()
        if not self.phases:
            self._start_step()
        elif self.failing_badly():
            self.stop_reason = "failure ratio above max_failure_ratio"
            return self._finish(elapsed)
        elif elapsed - self.step_started >= self.step_s:
            if not self._judge_step():
                return self._finish(elapsed)
            self._start_step()
        users = self.pool_size(self.rate)
        return users, users

    def _start_step(self) -> None:
        self.step_started = self.get_run_time()
        self.current_rate = self.rate
        self.begin_phase(f"{self.rate:g}/s", self.rate, self.pool_size(self.rate))

    def _judge_step(self) -> bool:
        """Record the finished step's figures; True when the search goes on."""
        phase = self.phases[-1]
        now = time.time()
        # Arrivals lag the publishes: fetch the latest before judging e2e.
        self._last_poll = 0.0
        self.poll()
        figures = self.meter.window(phase["start"] + self.settle_s, now)
        problems = step_problems(figures, self.rate, self.thresholds)
        phase.update(measured=figures, held=not problems, problems=problems)
        if not problems:
            self.last_held = self.rate
            self.retries = 0
            self.rate += self.step_rate
            if self.rate > self.ceiling_rate:
                self.stop_reason = "reached ceiling_rate"
                return False
            return True
        if self.retries < self.confirm_steps:
            self.retries += 1
            return True
        self.stop_reason = f"{self.rate:g}/s missed: " + "; ".join(problems)
        return False

    def _finish(self, elapsed: float) -> tuple[int, float] | None:
        self.finished = True
        self.current_rate = 0.0
        self._cooldown_until = elapsed + self.cooldown_s
        self.end_phases("completed")
        return self.runner.user_count if self.runner else 0, 100

    def write_status(self, final: bool) -> None:
        super().write_status(final)
        if final:
            self._write_json("max.json", {
                "last_held_rate": self.last_held, "stop_reason": self.stop_reason,
                "steps": [phase for phase in self.phases if "measured" in phase],
            })


def step_problems(figures: dict[str, Any], rate: float, limits: Thresholds) -> list[str]:
    """What a window missed of the thresholds, as sentences; empty when it held."""
    problems = []
    if limits.rate_tolerance is not None and figures["rate"] < rate * (1 - limits.rate_tolerance):
        problems.append(f"rate {figures['rate']:.0f}/s below {rate:g}/s")
    if figures["failures"] > limits.max_failures:
        problems.append(f"{figures['failures']} failed publishes")
    for key, limit in (("post_p95_ms", limits.post_p95_ms), ("post_p99_ms", limits.post_p99_ms),
                       ("e2e_p95_ms", limits.e2e_p95_ms)):
        value = figures.get(key)
        if limit is not None and value is not None and value > limit:
            problems.append(f"{key} {value:.0f} > {limit:g}")
    if limits.e2e_p95_ms is not None and figures.get("e2e_count") == 0 and figures["accepted"]:
        problems.append("no deliveries arrived in the window")
    return problems


def build(profile_name: str, overrides: dict[str, float] | None = None) -> type[KoerierShape]:
    """The shape class for a profile, with its knobs (and any overrides) as attributes."""
    profile = profile_named(profile_name)
    base = {"ConstantRate": ConstantRate, "StepUsers": StepUsers, "RaiseRate": RaiseRate}[
        profile.shape
    ]
    knobs: dict[str, Any] = dict(profile.knobs)
    for name, value in (overrides or {}).items():
        if not hasattr(base, name):
            raise ValueError(f"{profile.shape} has no knob {name!r}")
        knobs[name] = value
    knobs.update(abstract=False, profile_name=profile.name, thresholds=profile.thresholds)
    # The metaclass of LoadTestShape, so the new class is registered like a written one.
    shape: type[KoerierShape] = type(base)(base.__name__, (base,), knobs)  # type: ignore[misc]
    return shape
