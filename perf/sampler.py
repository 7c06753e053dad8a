"""CPU and memory of every process of a run, per component, sampled in a background thread.

A component is a root process and all its descendants (``koerier serve`` and its replicas,
the postmaster and its backends, the Erlang VM under ``rabbitmq-server``). CPU is the
difference of user+system time between two samples, as a percentage of one core, so 200 %
is both cores of this machine. Memory is PSS where the kernel offers it: shared pages (the
forked replicas' code, PostgreSQL's shared buffers) are divided among the processes that
share them instead of being counted once per process.

The machine's total CPU is sampled too; ``other`` is whatever ran that was not ours (other
test suites on a shared machine), which is the noise to read the figures against.
"""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import psutil


class Sampler:
    """Writes ``samples.csv`` (time, component, cpu_percent, memory_mb, processes)."""

    def __init__(self, components: dict[str, int], out: Path, interval_s: float = 1.0):
        self.components = dict(components)
        self.out = out
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._cpu_seconds: dict[int, float] = {}
        self._processes: dict[int, psutil.Process] = {}
        # Largest PSS seen per (component, process name), for the memory-per-process table.
        self.peak_memory: dict[str, dict[str, float]] = {}
        self.load_averages: list[tuple[float, float, float]] = []
        # The last sample's CPU per component, for the runner's progress line.
        self.latest: dict[str, float] = {}

    def add(self, name: str, pid: int) -> None:
        self.components[name] = pid

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _members(self, root_pid: int) -> list[psutil.Process]:
        try:
            root = self._processes.setdefault(root_pid, psutil.Process(root_pid))
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        # Keep one Process object per pid: psutil checks the pid was not reused by another.
        return [self._processes.setdefault(member.pid, member) for member in members]

    def _loop(self) -> None:
        with open(self.out, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["time", "component", "cpu_percent", "memory_mb", "processes"])
            psutil.cpu_percent()
            last = time.monotonic()
            ticks = 0
            while not self._stop.wait(self.interval_s):
                now = time.monotonic()
                elapsed = max(now - last, 1e-6)
                last = now
                ticks += 1
                # Memory every fifth sample: PSS reads smaps, which costs more than cpu_times.
                with_memory = ticks % 5 == 1
                ours = 0.0
                stamp = f"{time.time():.3f}"
                for name, root_pid in list(self.components.items()):
                    cpu, memory, count = self._sample(name, root_pid, elapsed, with_memory)
                    ours += cpu
                    self.latest[name] = cpu
                    writer.writerow([stamp, name, f"{cpu:.1f}",
                                     f"{memory:.1f}" if with_memory else "", count])
                total = psutil.cpu_percent() * psutil.cpu_count()
                writer.writerow([stamp, "other", f"{max(total - ours, 0.0):.1f}", "", ""])
                self.latest["other"] = max(total - ours, 0.0)
                self.load_averages.append(os.getloadavg())
                handle.flush()

    def _sample(self, name: str, root_pid: int, elapsed: float,
                with_memory: bool) -> tuple[float, float, int]:
        cpu = 0.0
        memory = 0.0
        members = self._members(root_pid)
        for process in members:
            try:
                times = process.cpu_times()
                seconds = times.user + times.system
                previous = self._cpu_seconds.get(process.pid)
                self._cpu_seconds[process.pid] = seconds
                if previous is not None:
                    cpu += max(seconds - previous, 0.0) / elapsed * 100.0
                if with_memory:
                    megabytes = self._memory_mb(process)
                    memory += megabytes
                    label = process.name()
                    peaks = self.peak_memory.setdefault(name, {})
                    key = f"{label} ({process.pid})"
                    peaks[key] = max(peaks.get(key, 0.0), megabytes)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return cpu, memory, len(members)

    @staticmethod
    def _memory_mb(process: psutil.Process) -> float:
        try:
            info = process.memory_full_info()
            value = getattr(info, "pss", None) or info.rss
        except (psutil.AccessDenied, psutil.ZombieProcess):
            value = process.memory_info().rss
        return float(value) / (1024 * 1024)
