"""Turns a run's raw logs into ``summary.json``, ``report.md``, PNG charts and a verdict.

Inputs in the result directory: ``raw/published.csv`` (one row per publish, from the
locustfile), ``raw/arrivals.csv`` (one row per delivery, from the sink), ``phases.json``
(from the shape), ``samples.csv`` (from the sampler) and ``context.json`` (from the runner).
Everything is judged from these raw rows, not from locust's rolling statistics, so the
report can be rebuilt later: ``python -m perf.report perf/results/<dir>``.

End-to-end latency is *publish accepted* (the publisher has its 201) to *subscriber
received*, per delivery, first arrival only.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perf.profiles import Thresholds, profile_named
from perf.stats import percentile, sorted_percentile


@dataclass
class Publish:
    key: str
    sent_at: float
    done_at: float
    latency_ms: float
    ok: bool


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Run:
    """The raw rows of one run, loaded."""

    directory: Path
    context: dict[str, Any]
    phases: dict[str, Any]
    publishes: list[Publish] = field(default_factory=list)
    # (subscriber, key) -> arrival times, in arrival order
    arrivals: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    attempts: Counter[str] = field(default_factory=Counter)
    samples: list[tuple[float, str, float, float | None]] = field(default_factory=list)


def load(directory: Path) -> Run:
    context = _read_json(directory / "context.json")
    phases = _read_json(directory / "phases.json")
    run = Run(directory, context, phases)

    published = directory / "raw" / "published.csv"
    if published.exists():
        with open(published, newline="") as handle:
            for row in csv.DictReader(handle):
                run.publishes.append(Publish(
                    row["key"], float(row["sent_at"]), float(row["done_at"]),
                    float(row["latency_ms"]), not row["error"],
                ))
    run.publishes.sort(key=lambda publish: publish.done_at)

    arrivals: dict[tuple[int, str], list[float]] = defaultdict(list)
    arrivals_file = directory / "raw" / "arrivals.csv"
    if arrivals_file.exists():
        with open(arrivals_file, newline="") as handle:
            for row in csv.DictReader(handle):
                arrivals[(int(row["subscriber"]), row["key"])].append(float(row["received_at"]))
                run.attempts[row["attempt"] or "?"] += 1
    run.arrivals = dict(arrivals)

    samples_file = directory / "samples.csv"
    if samples_file.exists():
        with open(samples_file, newline="") as handle:
            for row in csv.DictReader(handle):
                memory = float(row["memory_mb"]) if row["memory_mb"] else None
                run.samples.append(
                    (float(row["time"]), row["component"], float(row["cpu_percent"]), memory)
                )
    return run


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


# -- figures ------------------------------------------------------------------------------

def judged_window(run: Run) -> tuple[float, float, str]:
    """The wall-time window a verdict is about: a tier's hold phase, else the whole run."""
    phases = run.phases.get("phases", [])
    hold = [phase for phase in phases if phase["name"] == "hold" and phase.get("end")]
    if hold:
        return hold[0]["start"], hold[0]["end"], "hold phase"
    if phases:
        end = phases[-1].get("end") or phases[-1]["start"]
        return phases[0]["start"], end, "whole run"
    if run.publishes:
        return run.publishes[0].sent_at, run.publishes[-1].done_at, "whole run"
    return 0.0, 0.0, "empty run"


def window_figures(run: Run, start: float, end: float) -> dict[str, Any]:
    """Rate, POST latency and e2e latency of the publishes that completed in a window."""
    subscribers = int(run.context.get("subscribers", 1))
    inside = [publish for publish in run.publishes if start <= publish.done_at < end]
    accepted = [publish for publish in inside if publish.ok]
    latencies = [publish.latency_ms for publish in accepted]
    e2e = []
    for publish in accepted:
        for index in range(subscribers):
            times = run.arrivals.get((index, publish.key))
            if times:
                e2e.append((min(times) - publish.done_at) * 1000.0)
    span = max(end - start, 1e-9)
    return {
        "seconds": round(span, 2),
        "accepted": len(accepted),
        "failed": len(inside) - len(accepted),
        "rate": round(len(accepted) / span, 2),
        "post_p50_ms": _round(percentile(latencies, 0.50)),
        "post_p95_ms": _round(percentile(latencies, 0.95)),
        "post_p99_ms": _round(percentile(latencies, 0.99)),
        "post_max_ms": _round(max(latencies) if latencies else None),
        "e2e_p50_ms": _round(percentile(e2e, 0.50)),
        "e2e_p95_ms": _round(percentile(e2e, 0.95)),
        "e2e_p99_ms": _round(percentile(e2e, 0.99)),
        "e2e_max_ms": _round(max(e2e) if e2e else None),
        "e2e_count": len(e2e),
    }


def delivery_figures(run: Run) -> dict[str, Any]:
    """Exactly-once accounting over the whole run, after the drain."""
    subscribers = int(run.context.get("subscribers", 1))
    accepted = {publish.key for publish in run.publishes if publish.ok}
    failed = {publish.key for publish in run.publishes if not publish.ok}
    expected = len(accepted) * subscribers
    once = duplicates = lost = 0
    for key in accepted:
        for index in range(subscribers):
            count = len(run.arrivals.get((index, key), ()))
            if count == 0:
                lost += 1
            else:
                once += 1
                duplicates += count - 1
    decoy = sum(len(times) for (index, _), times in run.arrivals.items()
                if index >= subscribers)
    unknown = sum(len(times) for (index, key), times in run.arrivals.items()
                  if index < subscribers and key not in accepted and key not in failed)
    after_failed = sum(len(times) for (index, key), times in run.arrivals.items()
                       if index < subscribers and key in failed)
    return {
        "accepted_notifications": len(accepted),
        "subscribers": subscribers,
        "expected": expected,
        "delivered": once,
        "duplicates": duplicates,
        "lost": lost,
        "to_decoys": decoy,
        "unknown_keys": unknown,
        "for_failed_publishes": after_failed,
        "attempt_headers": dict(run.attempts),
    }


def resource_figures(run: Run, start: float, end: float) -> dict[str, Any]:
    """Mean and peak CPU (% of one core) and peak memory (MB) per component in a window."""
    cpu: dict[str, list[float]] = defaultdict(list)
    memory: dict[str, float] = defaultdict(float)
    for moment, component, percent, megabytes in run.samples:
        if start <= moment <= end:
            cpu[component].append(percent)
        if megabytes is not None:
            memory[component] = max(memory[component], megabytes)
    return {
        component: {
            "cpu_mean": round(sum(values) / len(values), 1),
            "cpu_peak": round(max(values), 1),
            "memory_peak_mb": round(memory[component], 1) if component in memory else None,
        }
        for component, values in cpu.items()
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# -- verdict ------------------------------------------------------------------------------

def checks_for(run: Run, limits: Thresholds, figures: dict[str, Any],
               deliveries: dict[str, Any]) -> list[Check]:
    checks = []
    if limits.min_max_rate is not None:
        # ``max`` runs into its limits on purpose: the steps were judged by the shape, and
        # what is left to judge is the rate that held and that nothing accepted was lost.
        held = _read_json(run.directory / "max.json").get("last_held_rate")
        checks.append(Check(
            f"max rate >= {limits.min_max_rate:g}/s",
            held is not None and held >= limits.min_max_rate,
            f"last rate that held: {held if held is not None else 'none'}/s",
        ))
        checks.append(exactly_once_check(deliveries))
        return checks
    target = run.context.get("target_rate")
    if limits.rate_tolerance is not None and target:
        low, high = target * (1 - limits.rate_tolerance), target * (1 + limits.rate_tolerance)
        checks.append(Check(
            "rate held", low <= figures["rate"] <= high,
            f"{figures['rate']:.1f}/s achieved, target {target:g}/s "
            f"+-{limits.rate_tolerance:.0%}",
        ))
    total_failed = sum(1 for publish in run.publishes if not publish.ok)
    checks.append(Check("no failed publishes", total_failed <= limits.max_failures,
                        f"{total_failed} failed of {len(run.publishes)}"))
    for key, limit, label in (("post_p95_ms", limits.post_p95_ms, "POST p95"),
                              ("post_p99_ms", limits.post_p99_ms, "POST p99"),
                              ("e2e_p95_ms", limits.e2e_p95_ms, "end-to-end p95")):
        if limit is None:
            continue
        value = figures.get(key)
        checks.append(Check(f"{label} < {limit:g} ms", value is not None and value < limit,
                            f"{value} ms" if value is not None else "no data"))
    if limits.exactly_once:
        checks.append(exactly_once_check(deliveries))
    return checks


def exactly_once_check(deliveries: dict[str, Any]) -> Check:
    clean = (deliveries["lost"] == 0 and deliveries["duplicates"] == 0
             and deliveries["to_decoys"] == 0 and deliveries["expected"] > 0)
    return Check(
        "delivered exactly once", clean,
        f"{deliveries['delivered']}/{deliveries['expected']} delivered, "
        f"{deliveries['lost']} lost, {deliveries['duplicates']} duplicates, "
        f"{deliveries['to_decoys']} to non-matching abonnementen",
    )


def generator_warnings(run: Run, resources: dict[str, Any]) -> list[str]:
    """Signs that the load generator, not Koerier, limited the run."""
    warnings = []
    missed = run.phases.get("missed_slots", 0)
    late = run.phases.get("late_sends", 0)
    if missed:
        warnings.append(f"{missed} send slots were missed: every user was waiting for an "
                        "answer (Koerier slower than the rate) or locust was starved of CPU")
    if late and run.publishes and late > 0.01 * len(run.publishes):
        warnings.append(f"{late} sends started more than 50 ms after their slot")
    locust = resources.get("locust", {})
    if locust.get("cpu_mean", 0) > 85:
        warnings.append(f"locust used {locust['cpu_mean']}% of a core on average: it is "
                        "single-threaded, so the generator may be the bottleneck")
    return warnings


# -- charts -------------------------------------------------------------------------------

def draw_charts(run: Run, limits: Thresholds) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run.publishes:
        return []
    origin = min(publish.sent_at for publish in run.publishes)
    last = max(publish.done_at for publish in run.publishes)
    all_arrivals = [t for times in run.arrivals.values() for t in times]
    if all_arrivals:
        last = max(last, max(all_arrivals))
    buckets = int(last - origin) + 1
    title = f"{run.context.get('profile', '?')} - {run.directory.name}"
    names = []

    # Throughput: accepted publishes, failures and deliveries per second, with the target.
    accepted = [0] * buckets
    failed = [0] * buckets
    delivered = [0] * buckets
    for publish in run.publishes:
        index = int(publish.done_at - origin)
        (accepted if publish.ok else failed)[index] += 1
    for moment in all_arrivals:
        delivered[min(int(moment - origin), buckets - 1)] += 1
    figure, axis = plt.subplots(figsize=(10, 4.5))
    seconds = list(range(buckets))
    axis.plot(seconds, accepted, label="publishes accepted (201)/s", color="tab:blue")
    axis.plot(seconds, delivered, label="deliveries received/s", color="tab:green", alpha=0.8)
    if any(failed):
        axis.plot(seconds, failed, label="failed publishes/s", color="tab:red")
    for phase in run.phases.get("phases", []):
        if phase.get("target_rate") and phase.get("end"):
            axis.hlines(phase["target_rate"], phase["start"] - origin, phase["end"] - origin,
                        colors="black", linestyles="dashed", linewidth=1)
    phases = run.phases.get("phases", [])
    if any(phase.get("target_rate") for phase in phases):
        axis.plot([], [], "k--", linewidth=1, label="target rate")
    axis.set(xlabel="seconds", ylabel="per second", title=f"Throughput - {title}")
    axis.legend(loc="lower right")
    if phases and not any(phase.get("target_rate") for phase in phases):
        # A closed model has no target rate; show the number of users per step instead.
        users = axis.twinx()
        for phase in phases:
            if phase.get("users") and phase.get("end"):
                users.hlines(phase["users"], phase["start"] - origin, phase["end"] - origin,
                             colors="grey", linestyles="dotted", linewidth=1.5)
        users.set_ylabel("users (dotted)")
        users.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(run.directory / "throughput.png", dpi=80)
    plt.close(figure)
    names.append("throughput.png")

    # Latency: POST percentiles per second, end-to-end percentiles per second of publish.
    subscribers = int(run.context.get("subscribers", 1))
    post: list[list[float]] = [[] for _ in range(buckets)]
    e2e: list[list[float]] = [[] for _ in range(buckets)]
    for publish in run.publishes:
        if not publish.ok:
            continue
        index = int(publish.done_at - origin)
        post[index].append(publish.latency_ms)
        for subscriber in range(subscribers):
            times = run.arrivals.get((subscriber, publish.key))
            if times:
                e2e[index].append((min(times) - publish.done_at) * 1000.0)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    _percentile_lines(top, post, ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")))
    for limit, label in ((limits.post_p95_ms, "p95 limit"), (limits.post_p99_ms, "p99 limit")):
        if limit is not None:
            top.axhline(limit, linestyle="dashed", linewidth=1, color="grey", label=label)
    top.set(ylabel="ms", title=f"POST /notificaties latency - {title}", yscale="log")
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    _percentile_lines(bottom, e2e, ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")))
    if limits.e2e_p95_ms is not None:
        bottom.axhline(limits.e2e_p95_ms, linestyle="dashed", linewidth=1, color="grey",
                       label="p95 limit")
    bottom.set(xlabel="seconds (by time of publish)", ylabel="ms", yscale="log",
               title="end-to-end: publish accepted -> subscriber received")
    bottom.legend(loc="upper left", fontsize="small")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(run.directory / "latency.png", dpi=80)
    plt.close(figure)
    names.append("latency.png")

    # CPU per component, stacked, against the machine's capacity. One x per sample (the
    # sampler stamps all components of a sample alike), so no second is dropped or doubled.
    if run.samples:
        series: dict[str, dict[float, float]] = defaultdict(dict)
        for moment, component, percent, _ in run.samples:
            series[component][moment] = percent
        stamps = sorted({moment for moment, _, _, _ in run.samples})
        known: tuple[str, ...] = ("api", "worker", "postgresql", "rabbitmq", "locust", "sink",
                                  "other")
        order = [name for name in known if name in series]
        order += [name for name in series if name not in order]
        figure, axis = plt.subplots(figsize=(10, 4.5))
        axis.stackplot([moment - origin for moment in stamps],
                       *[[series[name].get(moment, 0.0) for moment in stamps] for name in order],
                       labels=order, alpha=0.85)
        capacity = 100.0 * float(run.context.get("cpu_count", 2))
        axis.axhline(capacity, color="black", linewidth=1, linestyle="dashed",
                     label="all cores")
        axis.set(xlabel="seconds", ylabel="% of one core", title=f"CPU per component - {title}")
        axis.legend(loc="upper left", fontsize="small", ncol=4)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(run.directory / "cpu.png", dpi=80)
        plt.close(figure)
        names.append("cpu.png")
    return names


def _percentile_lines(axis: Any, buckets: list[list[float]],
                      fractions: tuple[tuple[float, str], ...]) -> None:
    for fraction, label in fractions:
        xs, ys = [], []
        for second, values in enumerate(buckets):
            if values:
                values.sort()
                xs.append(second)
                ys.append(sorted_percentile(values, fraction))
        axis.plot(xs, ys, label=label, linewidth=1.2)


# -- writing ------------------------------------------------------------------------------

def build(directory: Path) -> tuple[dict[str, Any], bool]:
    """Write summary.json, report.md and the charts; return the summary and the verdict."""
    run = load(directory)
    profile = profile_named(run.context["profile"])
    limits = profile.thresholds
    start, end, window_name = judged_window(run)
    figures = window_figures(run, start, end)
    deliveries = delivery_figures(run)
    resources = resource_figures(run, start, end)
    # CPU cost per accepted notification: the figure that sizing scales from.
    for values in resources.values():
        values["cpu_ms_per_notification"] = (
            round(values["cpu_mean"] * 10.0 / figures["rate"], 2) if figures["rate"] else None
        )
    checks = checks_for(run, limits, figures, deliveries)
    passed = all(check.passed for check in checks)
    steps = [
        {"name": phase["name"], "target_rate": phase.get("target_rate"),
         "users": phase.get("users"), "held": phase.get("held"),
         **window_figures(run, phase["start"], phase.get("end") or end)}
        for phase in run.phases.get("phases", [])
    ]
    summary = {
        "profile": profile.name,
        "verdict": "PASS" if passed else "FAIL",
        "checks": [check.__dict__ for check in checks],
        "window": {"name": window_name, "start": start, "end": end},
        "publish": figures,
        "deliveries": deliveries,
        "resources": resources,
        "memory_per_process_mb": _read_json(directory / "memory.json"),
        "steps": steps,
        "max": _read_json(directory / "max.json") or None,
        "stop_reason": run.phases.get("stop_reason"),
        "generator": {
            "missed_slots": run.phases.get("missed_slots", 0),
            "late_sends": run.phases.get("late_sends", 0),
            "warnings": generator_warnings(run, resources),
        },
        "thresholds": limits.as_dict(),
        "context": run.context,
    }
    charts = draw_charts(run, limits)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2))
    (directory / "report.md").write_text(markdown(summary, charts))
    return summary, passed


def markdown(summary: dict[str, Any], charts: list[str]) -> str:
    context = summary["context"]
    publish = summary["publish"]
    deliveries = summary["deliveries"]
    lines = [
        f"# perf run: {summary['profile']} - {summary['verdict']}",
        "",
        f"Command: `{context.get('command', '')}`  ",
        f"Commit: `{context.get('commit', '?')}`, started {context.get('started', '?')}, "
        f"target {context.get('target', '?')}  ",
        f"Stack: {context.get('stack_description', '?')}"
        + (f", niceness {context['nice']}" if context.get("nice") else "") + "  ",
        f"Machine: {context.get('cpu_count', '?')} CPUs; load average before "
        f"{context.get('load_before')}, during (mean/max) {context.get('load_during')}, "
        f"after {context.get('load_after')}",
        "",
        "## Verdict",
        "",
        "| check | result | measured |",
        "| --- | --- | --- |",
    ]
    for check in summary["checks"]:
        lines.append(f"| {check['name']} | {'pass' if check['passed'] else '**FAIL**'} | "
                     f"{check['detail']} |")
    lines += [
        "",
        f"## Publishing ({summary['window']['name']}, {publish['seconds']} s)",
        "",
        "| accepted | failed | rate/s | POST p50 | p95 | p99 | max | e2e p50 | p95 | p99 | max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {publish['accepted']} | {publish['failed']} | {publish['rate']} | "
        f"{publish['post_p50_ms']} | {publish['post_p95_ms']} | {publish['post_p99_ms']} | "
        f"{publish['post_max_ms']} | {publish['e2e_p50_ms']} | {publish['e2e_p95_ms']} | "
        f"{publish['e2e_p99_ms']} | {publish['e2e_max_ms']} |",
        "",
        "Latencies in ms. End-to-end: publisher has its 201 -> the sink received the delivery.",
        "",
        "## Deliveries (whole run, after the drain)",
        "",
        f"{deliveries['accepted_notifications']} accepted notifications x "
        f"{deliveries['subscribers']} matching abonnementen = {deliveries['expected']} "
        f"expected; {deliveries['delivered']} delivered, {deliveries['lost']} lost, "
        f"{deliveries['duplicates']} duplicates, {deliveries['to_decoys']} to non-matching "
        f"abonnementen, {deliveries['unknown_keys']} with an unknown key, "
        f"{deliveries['for_failed_publishes']} for publishes that failed. "
        f"Attempt headers seen: {deliveries['attempt_headers']}.",
        "",
        "## Resources (same window)",
        "",
        "| component | CPU mean % | CPU peak % | CPU ms per notification | memory peak MB (PSS) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for component, values in summary["resources"].items():
        peak = values["memory_peak_mb"]
        lines.append(f"| {component} | {values['cpu_mean']} | {values['cpu_peak']} | "
                     f"{values.get('cpu_ms_per_notification')} | "
                     f"{peak if peak is not None else ''} |")
    lines += ["", "CPU in % of one core (200 % = both cores). `other` is everything on the "
              "machine that was not part of the run.", ""]
    memory = summary["memory_per_process_mb"]
    if memory:
        lines += ["Peak memory per process (MB, PSS):", ""]
        for component, processes in memory.items():
            listed = ", ".join(f"{name} {value:.0f}" for name, value in
                               sorted(processes.items(), key=lambda item: -item[1])[:8])
            lines.append(f"- {component}: {listed}")
        lines.append("")
    if len(summary["steps"]) > 1:
        lines += [
            "## Phases",
            "",
            "| phase | target/s | users | accepted/s | failed | POST p95 | p99 | e2e p95 | held |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for step in summary["steps"]:
            held = {True: "yes", False: "no"}.get(step.get("held"), "")
            lines.append(
                f"| {step['name']} | {step['target_rate'] or ''} | {step['users'] or ''} | "
                f"{step['rate']} | {step['failed']} | {step['post_p95_ms']} | "
                f"{step['post_p99_ms']} | {step['e2e_p95_ms']} | {held} |"
            )
        lines += ["", "Figures per whole phase. `held` is the shape's own judgement of a "
                  "`max` step, made on the step without its first `settle_s` seconds.", ""]
    if summary["max"]:
        lines += [f"**Last rate that held: {summary['max'].get('last_held_rate')}/s** "
                  f"(stopped: {summary['max'].get('stop_reason')}).", ""]
    warnings = summary["generator"]["warnings"]
    if warnings:
        lines += ["## Load generator warnings", ""] + [f"- {text}" for text in warnings] + [""]
    for chart in charts:
        lines += [f"![{chart}]({chart})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = argv if argv is not None else sys.argv[1:]
    if len(arguments) != 1:
        print("usage: python -m perf.report RESULT_DIRECTORY", file=sys.stderr)
        return 2
    summary, passed = build(Path(arguments[0]))
    print(f"{summary['profile']}: {summary['verdict']}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
