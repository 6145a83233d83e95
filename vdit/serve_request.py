"""Request fields of `vdit serve` (vdit/serve.py): text and number fields of the page's JSON,
checked by name, and the single byte range a browser asks for when it seeks in a video."""

from __future__ import annotations

import re


def text_field(body: dict, key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected text, got {type(value).__name__} {value!r:.80}")
    return value.strip()


def number_field(body: dict, key: str, kind, default, low, high):
    """A number field (JSON number, or the page's form text); an integer field refuses 9.7."""
    value = body.get(key)
    if value is None or value == "":
        return kind(default)
    kind_name = "an integer" if kind is int else "a number"
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            number = int(number)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key}: {value!r} is not {kind_name}") from None
    if not low <= number <= high:  # NaN fails too
        raise ValueError(f"{key}: {number} is out of range [{low}, {high}]")
    return number


def byte_range(header: str, size: int):
    """A single `bytes=a-b` / `a-` / `-n` range -> (start, end) inclusive, clamped to the file;
    "unsatisfiable" (416) when it starts past the end; None to send the whole file."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None  # syntactically invalid: ignored, as RFC 9110 says
    else:
        start, end = max(0, size - int(last)), size - 1
        if int(last) == 0:
            return "unsatisfiable"
    return "unsatisfiable" if start >= size else (start, end)
