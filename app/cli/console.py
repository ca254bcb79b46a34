"""One terminal for several processes: each line prefixed by the name of the process it came from.

`worker-1     | 2026-... INFO app.worker: worker ready ...`, the name colored on a terminal (not
in a pipe or a file, nor with `NO_COLOR` set). With JSON logs the output stays JSON lines: the
name goes into each object as `process` (a line that is not a JSON object becomes one, its
text as `message`).
"""

from __future__ import annotations

import io
import os
import sys
from typing import TextIO, cast

import msgspec

# ANSI colours that read on dark and light backgrounds
_COLOURS = ("36", "33", "32", "35", "34", "31", "96", "93")
_RESET = "\x1b[0m"
_decode_object = msgspec.json.Decoder(dict[str, object]).decode
_encode = msgspec.json.Encoder().encode


class Console:
    """Writes lines for named processes to one stream (stdout by default)."""

    def __init__(
        self,
        names: list[str],
        *,
        json_lines: bool = False,
        stream: TextIO | None = None,
        colour: bool | None = None,
    ) -> None:
        self._stream = stream or sys.stdout
        self._width = max(map(len, names), default=0)
        self._json = json_lines
        if colour is None:
            colour = self._stream.isatty() and not os.environ.get("NO_COLOR")
        self._colours = {
            name: f"\x1b[{_COLOURS[i % len(_COLOURS)]}m" if colour else ""
            for i, name in enumerate(names)
        }

    def write(self, name: str, line: str) -> None:
        """Write one line (without its newline) of process `name`."""
        if self._json:
            text = self._json_line(name, line)
        else:
            colour = self._colours.get(name, "")
            label = f"{name:<{self._width}} |"
            text = f"{colour}{label}{_RESET} {line}" if colour else f"{label} {line}"
        try:
            self._stream.write(text + "\n")
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            pass  # the reader went away (`jobworker dev | head`): the fleet goes on

    def _json_line(self, name: str, line: str) -> str:
        entry: dict[str, object] | None = None
        if line.startswith("{"):
            try:
                entry = _decode_object(line)
            except msgspec.DecodeError:
                entry = None
        if entry is None:
            entry = {"message": line}
        return _encode({"process": name, **entry}).decode()

    def stream_for(self, name: str) -> TextIO:
        """A text stream whose lines are written as process `name`'s (for a logging handler)."""
        return cast(TextIO, _LineStream(self, name))


class _LineStream(io.TextIOBase):
    """Splits what is written into lines for `Console.write` (a log record is one write)."""

    def __init__(self, console: Console, name: str) -> None:
        self._console = console
        self._name = name
        self._partial = ""

    def write(self, text: str) -> int:
        """Buffer `text`, writing each whole line."""
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._console.write(self._name, line)
        return len(text)
