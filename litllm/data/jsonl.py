"""The one reader of JSON list and JSON Lines files: rows with the line each starts on, so errors can point at it."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from litllm.errors import UserError

_WHITESPACE = re.compile(r"\s*")


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """`(line, row)` for every row of `path`: a JSON list (`[{...}, {...}]`) or JSON Lines (one object per line).

    `line` is 1-based: the line of a JSON Lines row, or the line where a list element starts. JSON Lines are read
    a line at a time (a pretraining corpus can be larger than memory); a JSON list is parsed whole.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        # lines end at "\n" only: universal newlines would also cut at a "\r" inside a JSON string
        with path.open(encoding="utf-8", newline="\n") as file:
            lines = enumerate(file, start=1)
            for number, line in lines:
                if not line.strip():
                    continue
                if line.lstrip().startswith("["):
                    yield from _json_list(path, "\n" * (number - 1) + line + file.read())
                    return
                yield number, _json_line(path, number, line)
                break
            for number, line in lines:
                if line.strip():
                    yield number, _json_line(path, number, line)
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _json_line(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path}:{number}: invalid JSON ({error.msg}); expected one JSON object per line, or a JSON list"
        ) from None


def _json_list(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
    yield from zip(_element_lines(text), rows)


def _element_lines(text: str) -> list[int]:
    """The line each element of the (valid) top-level JSON list in `text` starts on."""
    decoder = json.JSONDecoder()
    lines = []
    line, counted_to = 1, 0
    position = _WHITESPACE.match(text, text.index("[") + 1).end()
    while text[position] != "]":
        line += text.count("\n", counted_to, position)
        counted_to = position
        lines.append(line)
        _, position = decoder.raw_decode(text, position)
        # skip the comma (or nothing, before the closing bracket) and the whitespace around it
        position = _WHITESPACE.match(text, position).end()
        if text[position] == ",":
            position = _WHITESPACE.match(text, position + 1).end()
    return lines
