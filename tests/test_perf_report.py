"""The perf report's accounting on hand-made raw rows: losses, duplicates and stray
deliveries are counted from the logs and turn the verdict, never assumed away."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from perf import report

START = 1_800_000_000.0


def write_run(directory: Path, arrivals: list[tuple[int, str, float]],
              published: list[tuple[str, float, bool]]) -> Path:
    """A tier-50 result directory with two subscribers (0, 1) and one decoy (2)."""
    (directory / "raw").mkdir(parents=True)
    (directory / "context.json").write_text(json.dumps({
        "profile": "tier-50", "subscribers": 2, "decoys": 1, "target_rate": 50, "cpu_count": 2,
    }))
    (directory / "phases.json").write_text(json.dumps({"phases": [
        {"name": "hold", "start": START, "end": START + 10, "target_rate": 50, "users": 8},
    ]}))
    with open(directory / "raw" / "published.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "slot", "sent_at", "done_at", "latency_ms", "status", "error"])
        for key, moment, ok in published:
            writer.writerow([key, moment, moment, moment + 0.005, 5.0, 201 if ok else 500,
                             "" if ok else "expected 201, but got 500"])
    with open(directory / "raw" / "arrivals.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subscriber", "key", "received_at", "attempt", "notification_id"])
        for subscriber, key, moment in arrivals:
            writer.writerow([subscriber, key, moment, 1, "00000000-0000-0000-0000-000000000000"])
    return directory


def test_report_of_a_clean_run_counts_every_delivery_once(tmp_path: Path) -> None:
    published = [(f"run-{index}", START + index * 0.02, True) for index in range(500)]
    arrivals = [(subscriber, key, moment + 0.01) for key, moment, _ in published
                for subscriber in (0, 1)]
    directory = write_run(tmp_path / "run", arrivals, published)

    summary, passed = report.build(directory)

    assert summary["deliveries"]["delivered"] == 1000
    assert summary["deliveries"]["lost"] == 0
    assert summary["deliveries"]["duplicates"] == 0
    assert passed


@pytest.mark.parametrize(("change", "field", "expected"), [
    ("lose", "lost", 1),
    ("duplicate", "duplicates", 1),
    ("decoy", "to_decoys", 1),
    ("unknown", "unknown_keys", 1),
])
def test_report_counts_a_delivery_fault_and_fails(
    tmp_path: Path, change: str, field: str, expected: int
) -> None:
    published = [(f"run-{index}", START + index * 0.02, True) for index in range(500)]
    arrivals = [(subscriber, key, moment + 0.01) for key, moment, _ in published
                for subscriber in (0, 1)]
    if change == "lose":
        arrivals.pop()
    elif change == "duplicate":
        arrivals.append(arrivals[0])
    elif change == "decoy":
        arrivals.append((2, "run-0", START + 1))
    else:
        arrivals.append((0, "another-run-0", START + 1))
    directory = write_run(tmp_path / "run", arrivals, published)

    summary, passed = report.build(directory)

    assert summary["deliveries"][field] == expected
    if change != "unknown":  # a stray key from another run does not break this run
        assert not passed


def test_report_fails_a_run_with_failed_publishes(tmp_path: Path) -> None:
    published = [(f"run-{index}", START + index * 0.02, index != 7) for index in range(500)]
    arrivals = [(subscriber, key, moment + 0.01) for key, moment, ok in published if ok
                for subscriber in (0, 1)]
    directory = write_run(tmp_path / "run", arrivals, published)

    summary, passed = report.build(directory)

    assert summary["publish"]["failed"] == 1
    assert not passed
    assert (directory / "report.md").read_text().startswith("# perf run: tier-50 - FAIL")
