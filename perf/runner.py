"""``perf/run PROFILE``: one command from an idle machine to a judged, charted result.

Steps: start a local Koerier (or use ``--target``), start the sink, register the kanaal and
abonnementen through the API, run locust headless with the profile's shape while sampling
CPU and memory, let the deliveries drain, then write the result directory and print the
verdict. The exit code is 0 for PASS, 1 for FAIL, 2 when the run itself could not be done.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.harness import free_port, wait_for_port

from perf import arrange, hotspots, report
from perf.profiles import PROFILES, profile_named
from perf.sampler import Sampler
from perf.stack import LocalStack, StackOptions, write_statements

ROOT = Path(__file__).resolve().parent.parent
# The knob that --duration sets, per shape: what "how long" means for that shape.
DURATION_KNOB = {"ConstantRate": "hold_s", "StepUsers": "step_s", "RaiseRate": "step_s"}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="perf/run", description="Run a load profile against Koerier and judge it.",
        epilog="profiles: " + "; ".join(f"{p.name}: {p.description}" for p in PROFILES.values()),
    )
    parser.add_argument("profile", choices=sorted(PROFILES))
    parser.add_argument("--duration", type=float,
                        help="tiers: seconds at the target rate (default 60); ramp and max: "
                             "seconds per step (default 15)")
    parser.add_argument("--subscribers", type=int, default=1,
                        help="abonnementen that match every notification (default 1)")
    parser.add_argument("--decoys", type=int, default=1,
                        help="abonnementen that match none and must receive nothing (default 1)")
    parser.add_argument("--target", help="URL of a running Koerier instead of a local stack")
    parser.add_argument("--client-id", default=os.environ.get("PERF_CLIENT_ID", "perf"))
    parser.add_argument("--secret", default=os.environ.get("PERF_SECRET"),
                        help="the client's secret (with --target; else generated)")
    parser.add_argument("--sink-address", default="127.0.0.1",
                        help="address the sink listens on and Koerier calls back to")
    parser.add_argument("--api-processes", type=int, default=1)
    parser.add_argument("--worker-processes", type=int, default=1)
    parser.add_argument("--worker-concurrency", type=int, default=64)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help="override a shape knob, e.g. --knob rate=150 (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KOERIER_X=VALUE",
                        help="extra environment for the local Koerier (repeatable)")
    parser.add_argument("--results", type=Path, default=ROOT / "perf" / "results",
                        help="parent of the result directory (default perf/results)")
    parser.add_argument("--app", type=Path, metavar="DIR",
                        help="run the local Koerier from another checkout's app/ directory "
                             "(a git worktree with a candidate change), for A/B comparisons")
    parser.add_argument("--py-spy", action="store_true",
                        help="sample the API and worker processes with py-spy during the load "
                             "and write hotspots-<component>.md (local stack only)")
    parser.add_argument("--nice", type=int, default=0, metavar="N",
                        help="run the whole stack, sink and locust at this niceness, process "
                             "and autogroup (e.g. -5 on a machine shared with other work; "
                             "needs root); recorded in the report")
    parser.add_argument("--wait-quiet", type=float, metavar="LOAD",
                        help="before starting, wait (at most --wait-max s) until the 1-minute "
                             "load average is below LOAD: a shared machine measures noise")
    parser.add_argument("--wait-max", type=float, default=900.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds to wait for outstanding deliveries after the load")
    return parser.parse_args(argv)


class Progress:
    """Prints one line every few seconds: the shape's live status, the sink, the CPU."""

    def __init__(self, out: Path, sink_url: str, sampler: Sampler, every_s: float = 5.0):
        self.out = out
        self.sink_url = sink_url
        self.sampler = sampler
        self.every_s = every_s
        self.started = time.monotonic()
        self._last = 0.0

    def maybe_print(self) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        try:
            live = json.loads((self.out / "live.json").read_text())
        except (OSError, ValueError):
            live = {}
        recent = live.get("recent", {})
        cpu = " ".join(f"{name} {value:.0f}%" for name, value in self.sampler.latest.items())
        target = live.get("target_rate")
        p95 = recent.get("post_p95_ms")
        e2e = recent.get("e2e_p95_ms")
        print(
            f"[{now - self.started:5.0f}s] {live.get('phase', 'starting'):>10} "
            f"target {f'{target:.0f}/s' if target else '-':>7} "
            f"sent {recent.get('rate', 0):6.1f}/s "
            f"p95 {f'{p95:.0f}' if p95 is not None else '-':>4} ms "
            f"e2e95 {f'{e2e:.0f}' if e2e is not None else '-':>5} ms "
            f"fail {live.get('failures', 0)} delivered {sink_arrivals(self.sink_url)} | {cpu}",
            flush=True,
        )


def sink_arrivals(sink_url: str) -> int:
    try:
        with urllib.request.urlopen(f"{sink_url}/_sink/stats", timeout=5) as response:
            return int(json.loads(response.read())["arrivals"])
    except (OSError, ValueError, KeyError):
        return -1


def accepted_publishes(out: Path) -> int:
    import csv

    path = out / "raw" / "published.csv"
    if not path.exists():
        return 0
    with open(path, newline="") as handle:
        return sum(1 for row in csv.DictReader(handle) if not row["error"])


def git_commit(tree: Path) -> str:
    """The commit the measured app/ comes from, and whether app/ had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "app"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    label = commit + ("+uncommitted app changes" if dirty else "")
    return label if tree == ROOT else f"{label} ({tree})"


def knobs_from(args: argparse.Namespace) -> dict[str, float]:
    profile = profile_named(args.profile)
    knobs: dict[str, float] = {}
    if args.duration is not None:
        knobs[DURATION_KNOB[profile.shape]] = args.duration
    for item in args.knob:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--knob must be NAME=VALUE, but got {item!r}")
        knobs[name] = float(value)
    return knobs


def time_limit(profile_name: str, knobs: dict[str, float]) -> float:
    """A hard bound on the locust process, so a stuck run still ends by itself."""
    profile = profile_named(profile_name)
    merged = {**profile.knobs, **knobs}
    if profile.shape == "ConstantRate":
        return merged["ramp_s"] + merged["hold_s"] + 60
    if profile.shape == "StepUsers":
        steps = 1 + merged["last_users"] // merged["step_users"]
        return steps * merged["step_s"] + 60
    steps = merged["ceiling_rate"] / merged["step_rate"] * (1 + merged["confirm_steps"])
    return min(steps * merged["step_s"] + 60, 3600)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    profile = profile_named(args.profile)
    knobs = knobs_from(args)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.results / f"{stamp}-{profile.name}"
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    run_secret = secrets.token_hex(8)
    if args.target and not args.secret:
        print("--target needs --secret (or PERF_SECRET) of an API client with the "
              "publiceren and consumeren scopes", file=sys.stderr)
        return 2
    client_secret = args.secret or secrets.token_hex(16)

    print(f"perf/run {profile.name}: results in {out}", flush=True)
    if args.wait_quiet is not None:
        wait_until_quiet(args.wait_quiet, args.wait_max)
    if args.nice:
        # Every process of the run is a child of this one and inherits the niceness.
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    load_before = os.getloadavg()
    stack: LocalStack | None = None
    sink: subprocess.Popen[bytes] | None = None
    locust: subprocess.Popen[bytes] | None = None
    sampler: Sampler | None = None
    abonnementen: list[str] = []
    api: arrange.Api | None = None
    profilers: dict[str, subprocess.Popen[bytes]] = {}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        if args.target:
            target = args.target.rstrip("/")
            stack_description = f"external Koerier at {target}"
        else:
            extra = dict(item.split("=", 1) for item in args.env)
            if args.app is not None:
                # PYTHONPATH comes before the editable install, so this koerier wins.
                extra["PYTHONPATH"] = str(args.app.resolve())
            options = StackOptions(args.api_processes, args.worker_processes,
                                   args.worker_concurrency, args.log_level, extra)
            stack = LocalStack(options, raw, args.client_id, client_secret)
            stack.start(say=lambda text: print(f"  {text}", flush=True))
            target = stack.url
            stack_description = (
                f"local: koerier serve --processes {options.api_processes}, koerier worker "
                f"--processes {options.worker_processes} --concurrency "
                f"{options.worker_concurrency}, log level {options.log_level}, "
                f"PostgreSQL 15 (fsync off) and RabbitMQ from tests/harness.py"
                + (f", env {extra}" if extra else "")
            )

        sink_port = free_port()
        sink_url = f"http://{args.sink_address}:{sink_port}"
        sink = subprocess.Popen(
            [sys.executable, "-m", "perf.sink", "--host", args.sink_address,
             "--port", str(sink_port), "--subscribers", str(args.subscribers + args.decoys),
             "--secret", run_secret, "--out", str(raw / "arrivals.csv")],
            env=env, cwd=ROOT, stdout=open(raw / "sink.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(sink_port, host=args.sink_address)

        api = arrange.Api(target, args.client_id, client_secret)
        arrange.ensure_kanaal(api)
        abonnementen = arrange.create_abonnementen(api, sink_url, run_secret,
                                                   args.subscribers, args.decoys)
        print(f"  {len(abonnementen)} abonnementen created (the probes passed)", flush=True)

        sampler = Sampler(stack.components() if stack else {}, out / "samples.csv")
        sampler.add("sink", sink.pid)
        locust_env = dict(
            env, PERF_PROFILE=profile.name, PERF_KNOBS=json.dumps(knobs),
            PERF_CLIENT_ID=args.client_id, PERF_SECRET=client_secret,
            PERF_RUN_ID=run_secret, PERF_OUT=str(out), PERF_SINK_URL=sink_url,
        )
        locust_command = [
            sys.executable, "-m", "locust", "-f", str(ROOT / "perf" / "locustfile.py"),
            "--headless", "--host", target, "--csv", str(out / "locust"),
            "--only-summary", "--stop-timeout", "5", "--loglevel", "WARNING",
            "--logfile", str(raw / "locust.log"),
        ]
        limit = time_limit(profile.name, knobs)
        locust = subprocess.Popen(
            locust_command, env=locust_env, cwd=ROOT, stdout=open(raw / "locust.out", "ab"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        sampler.add("locust", locust.pid)
        if args.nice:
            renice_sessions(sampler.components, args.nice)
        sampler.start()
        if args.py_spy and stack is not None:
            profilers = start_profilers(stack.components(), raw)
        progress = Progress(out, sink_url, sampler)
        deadline = time.monotonic() + limit
        while locust.poll() is None:
            if time.monotonic() > deadline:
                print(f"  locust ran past its limit of {limit:.0f} s; stopping it", flush=True)
                os.killpg(locust.pid, signal.SIGINT)
                try:
                    locust.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(locust.pid, signal.SIGKILL)
                break
            progress.maybe_print()
            time.sleep(0.5)
        load_during = sampler.load_averages[:]
        stop_profilers(profilers)

        expected = accepted_publishes(out) * args.subscribers
        drained = drain(sink_url, expected, args.drain_timeout)
        sampler.stop()
        _post(f"{sink_url}/_sink/dump")
        if not args.target and stack is not None:
            (raw / "metrics.txt").write_text(arrange.metrics_text(target))
        (out / "memory.json").write_text(json.dumps(sampler.peak_memory, indent=1))

        context: dict[str, Any] = {
            "profile": profile.name,
            "knobs": {**profile.knobs, **knobs},
            "target_rate": {**profile.knobs, **knobs}.get("rate"),
            "command": "perf/run " + shlex.join(sys.argv[1:] if argv is None else argv),
            "commit": git_commit(args.app.resolve().parent if args.app else ROOT),
            "started": stamp,
            "target": target,
            "stack_description": stack_description,
            "subscribers": args.subscribers,
            "decoys": args.decoys,
            "cpu_count": os.cpu_count(),
            "load_before": [round(value, 2) for value in load_before],
            "load_during": _load_summary(load_during),
            "load_after": [round(value, 2) for value in os.getloadavg()],
            "drain": drained,
            "nice": args.nice,
            "locust_exit_code": locust.returncode,
        }
        (out / "context.json").write_text(json.dumps(context, indent=1))
    except Exception as error:  # the operator needs the reason and the logs, not a traceback
        print(f"perf/run could not complete: {error}", file=sys.stderr)
        print(f"logs are in {raw}", file=sys.stderr)
        return 2
    finally:
        if sampler is not None:
            sampler.stop()
        stop_profilers(profilers)
        if locust is not None and locust.poll() is None:
            os.killpg(locust.pid, signal.SIGKILL)
        if api is not None and args.target and abonnementen:
            arrange.delete_abonnementen(api, abonnementen)
        if sink is not None and sink.poll() is None:
            sink.terminate()
            sink.wait(30)
        if stack is not None:
            stack.stop()

    for name in profilers:
        hotspots.write(raw / f"pyspy-{name}.txt", out / f"hotspots-{name}.md", name)
    summary, passed = report.build(out)
    if stack is not None and stack.statements:
        write_statements(stack.statements, out / "statements.md",
                         summary["deliveries"]["accepted_notifications"])
    print_verdict(summary, out)
    return 0 if passed else 1


def renice_sessions(components: dict[str, int], nice: int) -> None:
    """Give each component's session (autogroup) the niceness too.

    With the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``)
    CPU is first shared between sessions, and a process's own niceness only counts within
    its session; every component runs in a session of its own, so without this ``--nice``
    would not change its share of a machine shared with other work.
    """
    for pid in components.values():
        try:
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))
        except OSError:
            continue


def wait_until_quiet(limit: float, most_s: float) -> None:
    started = time.monotonic()
    while os.getloadavg()[0] >= limit and time.monotonic() - started < most_s:
        print(f"  waiting for a quiet machine: load {os.getloadavg()[0]:.2f} >= {limit}",
              flush=True)
        time.sleep(15)


def start_profilers(components: dict[str, int],
                    raw: Path) -> dict[str, subprocess.Popen[bytes]]:
    """py-spy on the API and worker process trees; stopped with SIGINT, which makes it write.

    ``--nonblocking`` does not pause the sampled process, so the run stays close to an
    unprofiled one at the price of an occasional torn stack.
    """
    py_spy = Path(sys.executable).parent / "py-spy"
    profilers: dict[str, subprocess.Popen[bytes]] = {}
    for name in ("api", "worker"):
        if name not in components:
            continue
        profilers[name] = subprocess.Popen(
            [str(py_spy), "record", "--pid", str(components[name]), "--subprocesses",
             "--nonblocking", "--rate", "100", "--format", "raw",
             "--output", str(raw / f"pyspy-{name}.txt")],
            stdout=open(raw / f"pyspy-{name}.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return profilers


def stop_profilers(profilers: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in profilers.values():
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in profilers.values():
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def drain(sink_url: str, expected: int, timeout: float) -> dict[str, Any]:
    """Wait until the sink has every expected delivery, or nothing came in for 10 s."""
    started = time.monotonic()
    last_count, last_change = -1, started
    while True:
        count = sink_arrivals(sink_url)
        now = time.monotonic()
        if count != last_count:
            last_count, last_change = count, now
        if count >= expected or now - last_change > 10 or now - started > timeout:
            return {"expected": expected, "arrivals": count,
                    "seconds": round(now - started, 1)}
        time.sleep(0.5)


def _post(url: str) -> None:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()


def _load_summary(samples: list[tuple[float, float, float]]) -> list[float] | None:
    if not samples:
        return None
    one_minute = [sample[0] for sample in samples]
    return [round(sum(one_minute) / len(one_minute), 2), round(max(one_minute), 2)]


def print_verdict(summary: dict[str, Any], out: Path) -> None:
    publish = summary["publish"]
    print()
    print(f"{summary['profile']}: {publish['rate']}/s accepted, POST p50/p95/p99 "
          f"{publish['post_p50_ms']}/{publish['post_p95_ms']}/{publish['post_p99_ms']} ms, "
          f"e2e p50/p95 {publish['e2e_p50_ms']}/{publish['e2e_p95_ms']} ms")
    for check in summary["checks"]:
        print(f"  [{'pass' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    for warning in summary["generator"]["warnings"]:
        print(f"  [warn] {warning}")
    print(f"verdict: {summary['verdict']}  ({out / 'report.md'})")


if __name__ == "__main__":
    sys.exit(main())
