"""Parsing JSON that came from an untrusted file (a weights file's config, tokenizer files).

``json.loads`` on hostile text can recurse until ``RecursionError``, accept ``NaN`` and
``Infinity``, or spend its time on megabytes nobody needs. ``load_json`` bounds the size and the
nesting depth *before* parsing and rejects non-finite numbers, raising ``FormatError``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from ..errors import FormatError

MAX_CONFIG_BYTES = 1 << 20  # a model config is a few KB
MAX_JSON_BYTES = 64 << 20  # the largest JSON a weights file may carry (a big tokenizer.json is ~30 MB)
MAX_JSON_DEPTH = 64

_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"')  # possessive: linear, no backtracking
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_CHUNK = 1 << 20


def json_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in ``text``, brackets inside strings ignored (no parsing)."""
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", text)).encode("ascii")
    depth = deepest = 0
    for start in range(0, len(brackets), _CHUNK):  # chunks keep the running sums small
        steps = np.frombuffer(brackets, dtype=np.uint8, count=min(_CHUNK, len(brackets) - start), offset=start)
        levels = depth + np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1), dtype=np.int64)
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def load_json(text: str | bytes, what: str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse ``text``; ``what`` names it in errors ("model.parquet: metadata arrowvision.config").

    Raises FormatError when the text is larger than ``max_bytes``, nested deeper than
    ``max_depth``, not valid JSON, or holds NaN/Infinity (also as an overflowing literal like 1e999)."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > max_bytes:
        raise FormatError(f"{what}: JSON of {size} bytes is larger than the {max_bytes} allowed")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{what}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise FormatError(f"{what}: JSON nested {depth} levels deep; at most {max_depth} allowed")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
        _check_finite(value)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are huge int literals
        raise FormatError(f"{what}: not valid JSON ({exc})") from None
    return value


def _check_finite(value: Any) -> None:
    """1e999 parses to inf without going through parse_constant."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not np.isfinite(item):
            raise ValueError(f"non-finite number {item} is not allowed")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
