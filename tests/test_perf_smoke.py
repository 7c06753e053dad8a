"""Smoke run of the performance harness, so ``perf/run`` cannot rot between benchmarks.

It runs ``tier-50`` for 20 s against a throwaway local stack and checks that the harness
did its job: the result files are there and every delivery was counted. It does not judge
speed (the machine running the suite may be busy); ``perf/run`` itself does that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    results = tmp_path_factory.mktemp("perf-results")
    completed = subprocess.run(
        [str(ROOT / "perf" / "run"), "tier-50", "--duration", "20", "--subscribers", "2",
         "--results", str(results)],
        env=dict(os.environ, PERF_PYTHON=sys.executable), capture_output=True, text=True,
        timeout=400,
    )
    directories = sorted(results.glob("*-tier-50"))
    assert directories, f"no result directory:\n{completed.stdout}\n{completed.stderr}"
    return completed.returncode, directories[-1], completed.stdout + completed.stderr


def test_smoke_run_completes_with_a_verdict(smoke_result: tuple[int, Path, str]) -> None:
    returncode, _, output = smoke_result

    # 0 is PASS and 1 is FAIL on thresholds (speed); 2 would mean the harness broke.
    assert returncode in (0, 1), output
    assert "verdict: " in output


@pytest.mark.parametrize("name", [
    "summary.json", "report.md", "context.json", "phases.json", "samples.csv",
    "throughput.png", "latency.png", "cpu.png", "locust_stats.csv",
    "raw/published.csv", "raw/arrivals.csv",
])
def test_smoke_run_writes_result_file(smoke_result: tuple[int, Path, str], name: str) -> None:
    _, directory, _ = smoke_result

    assert (directory / name).stat().st_size > 0


def test_smoke_run_counts_every_delivery(smoke_result: tuple[int, Path, str]) -> None:
    _, directory, _ = smoke_result
    summary = json.loads((directory / "summary.json").read_text())
    deliveries = summary["deliveries"]

    assert deliveries["accepted_notifications"] > 500  # about 20 s at 50/s, plus the ramp
    assert deliveries["expected"] == 2 * deliveries["accepted_notifications"]
    assert deliveries["delivered"] == deliveries["expected"]
    assert deliveries["lost"] == 0
    assert deliveries["duplicates"] == 0
    assert deliveries["to_decoys"] == 0


def test_smoke_run_samples_every_component(smoke_result: tuple[int, Path, str]) -> None:
    _, directory, _ = smoke_result
    summary = json.loads((directory / "summary.json").read_text())

    assert {"api", "worker", "postgresql", "rabbitmq", "locust", "sink"} <= set(
        summary["resources"]
    )
