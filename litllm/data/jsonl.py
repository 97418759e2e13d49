"""Rows of a JSON list or JSON Lines file, each with the line it starts on, so errors can point at it."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from litllm.errors import UserError

_WHITESPACE = re.compile(r"\s*")


def read_rows(path: Path) -> list[tuple[int, Any]]:
    """`(line, row)` for every row of `path`: a JSON list (`[{...}, {...}]`) or JSON Lines (one object per line).

    `line` is 1-based: the line of a JSON Lines row, or the line where a list element starts.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
        return list(zip(_element_lines(text), rows))
    rows = []
    # split on "\n" only: str.splitlines would also split inside strings holding U+2028 and the like
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path}:{number}: invalid JSON ({error.msg}); expected one JSON object per line, or a JSON list"
            ) from None
    return rows


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
