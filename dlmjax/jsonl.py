"""JSONL input read one way everywhere (SFT data, prompts, eval answers, RL math / code tasks): every non-blank line,
and an error that names path:line for bytes that are not UTF-8 or a line that is not JSON. Standard library only
(the reward worker processes import the readers' modules too)."""

from __future__ import annotations

import json
from typing import Iterator


def lines(path: str, what: str, error: type[Exception]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line of `path`, streamed; a file that cannot be opened
    raises error("<path>: cannot open <what> (<reason>)")."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise error(f"{path}: cannot open {what} ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield n, raw


def parse(raw: bytes):
    """The JSON value of one line; ValueError saying why not: "not UTF-8 text (byte 0x.. at column c)" or
    "not valid JSON (<reason>)". Callers prefix "<path>:<line>: "."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
