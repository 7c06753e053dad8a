"""Where the time goes: a py-spy raw (collapsed stacks) file summarised as a short table.

py-spy's raw format has one line per distinct stack, ``frame;frame;...;leaf count``, each
frame ``function (file:line)``. Two views answer different questions: *self* time (the
leaf: what actually burns CPU) and *inclusive* time per package (how much of the process
goes to the database driver, the web framework, JSON, logging, ...).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def package_of(frame: str) -> str | None:
    """The top-level package of a frame's file: py-spy names files relative to sys.path."""
    match = FRAME.match(frame)
    if not match or not match["file"]:
        return None
    file = match["file"]
    for marker in ("site-packages/", "/app/", "/lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    head = file.split("/", 1)[0]
    return head[:-3] if head.endswith(".py") else head


def short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame[:90]
    file = match["file"]
    for marker in ("site-packages/", "/app/", "/lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{match['function']} ({file}:{match['line'] or '?'})"


def summarise(stacks: list[tuple[list[str], int]], top: int = 20) -> tuple[int, str]:
    total = sum(count for _, count in stacks)
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for frames, count in stacks:
        own[short(frames[-1])] += count
        seen = {package_of(frame) for frame in frames} - {None}
        for package in seen:
            packages[str(package)] += count
    lines = ["| self % | function (leaf frame) |", "| --- | --- |"]
    lines += [f"| {100 * count / total:.1f} | `{name}` |" for name, count in own.most_common(top)]
    lines += ["", "| inclusive % | package on the stack |", "| --- | --- |"]
    lines += [f"| {100 * count / total:.1f} | {name} |" for name, count in packages.most_common()
              if name.isidentifier() and count / total >= 0.005]
    return total, "\n".join(lines)


def write(source: Path, target: Path, component: str) -> None:
    if not source.exists() or source.stat().st_size == 0:
        return
    total, table = summarise(parse(source))
    target.write_text(
        f"# Hotspots: {component}\n\n{total} samples by py-spy (100/s, all processes of the "
        "component, idle time excluded). Self time is the frame that was running; inclusive "
        "is the share of samples with that package anywhere on the stack.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    write(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
