"""Text that is safe to show on one line: client-chosen strings in errors and logs.

A client may send megabytes, newlines or terminal escapes in an id or a value; these helpers make
sure such text never ends a line, forges another one or floods a message.
"""

from __future__ import annotations

import re

#: Characters escaped in text logs: C0 and C1 controls, DEL, and the Unicode line and paragraph
#: separators (some viewers break lines there), and lone surrogates (not encodable as UTF-8).
_UNSAFE = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\ud800-\\udfff]")


def escape(text: str) -> str:
    """``text`` with every control character (and lone surrogate) written as an escape."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line: whitespace runs collapsed, control characters escaped, at most ``limit`` characters."""
    text = escape(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a client's value may be megabytes long)."""
    text = repr(value) if not isinstance(value, (list, dict)) or len(value) <= 64 else f"<{type(value).__name__} of {len(value)} items>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
