"""Text from outside made safe to show: bounded, printable, one line (a hostile record must not forge log lines)."""

from __future__ import annotations


def printable(text: str | bytes, limit: int = 80) -> str:
    """``text`` quoted for a log line or an error message: escaped, and cut to ``limit`` characters (a 1 MB record
    must not make a 1 MB log line, nor a control character a fake one)."""
    shown = ascii(text[:limit])
    return shown + f"... ({len(text)} in all)" if len(text) > limit else shown


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one bounded line of ASCII, unquoted (messages that may carry parts of a record)."""
    shown = ascii(text[:limit])[1:-1]
    return shown + f"... ({len(text)} characters in all)" if len(text) > limit else shown


def shown(value: object) -> str:
    return printable(value) if isinstance(value, str | bytes) else printable(repr(value), 40)
