"""How a caught exception is named in a message: its type and the first line of its text."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


__all__ = ["one_line"]
