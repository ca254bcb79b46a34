#!/usr/bin/env python3
"""Sum up py-spy's raw stacks (`py-spy record -f raw`, as `tools/bench_e2e.py --profile` writes
them): the functions that take the most samples, by their own time and with what they call.

    .venv/bin/python tools/profile_top.py /tmp/prof/ours-r1-orchestrator.txt
    .venv/bin/python tools/profile_top.py --top 40 --grep app/ /tmp/prof/*-orchestrator.txt

Three tables: own time by package (app, redis, grpclib, asyncio, ...), own time by function,
and time with what each function calls.

Idle time (the event loop waiting in epoll/select) is shown as its own line and left out of
the percentages, so that they say where the busy time goes.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# a frame as py-spy writes it: "name (path/to/file.py:123)"; the line is dropped, to sum per
# function
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")
_IDLE = ("select (selectors.py)", "poll (selectors.py)", "epoll", "_run_once (asyncio/base_events")


def _function(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    path = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", path)
    if "/app/" in path:
        path = "app/" + path.split("/app/", 1)[1]
    return f"{match['name']} ({path})"


def summarize(paths: Sequence[Path]) -> tuple[int, int, Counter[str], Counter[str]]:
    """Busy samples, idle samples, own samples per function, inclusive samples per function."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    busy = idle = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_function(f) for f in stack.split(";") if f.strip()]
            if not frames:
                continue
            if any(mark in frames[-1] for mark in _IDLE):
                idle += count
                continue
            busy += count
            own[frames[-1]] += count
            for name in set(frames):
                inclusive[name] += count
    return busy, idle, own, inclusive


def package(function: str) -> str:
    """The package a summed-up function is in: `app`, `redis`, `asyncio`, ... (its file's first
    path part; a module of the standard library alone: its name)."""
    match = re.search(r"\(([^()/]+)(?:/|\.py\))", function)
    return match[1] if match else "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="py-spy raw files")
    parser.add_argument("--top", type=int, default=25, help="lines per table (25)")
    parser.add_argument("--grep", default="", help="only functions whose line contains this")
    args = parser.parse_args(argv)
    busy, idle, own, inclusive = summarize(args.files)
    if not busy:
        print("no busy samples")
        return 1
    print(f"{busy} busy samples, {idle} idle ({idle / (busy + idle):.0%} of all)")
    packages: Counter[str] = Counter()
    for name, count in own.items():
        packages[package(name)] += count
    for title, table in (("own time, by package", packages), ("own time", own),
                         ("with what it calls", inclusive)):  # fmt: skip
        print(f"\n{title}:")
        rows = [(n, c) for n, c in table.most_common() if args.grep in n][: args.top]
        for name, count in rows:
            print(f"  {count / busy:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
