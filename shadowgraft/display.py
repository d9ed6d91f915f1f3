"""Printing to the terminal when the text comes from strangers' files.

Tensor names, adapter targets, config values and paths are other people's
bytes: a name may hold ``ESC[2J`` (clears the screen), a NUL, ``\\r`` (rewrites
the line), rich markup (``[bold]``) or an emoji code (``:smile:``). Every such
string goes through ``shown`` before rich sees it, and the consoles here never
turn ``:name:`` codes into emoji, so what is printed is what the file holds.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.markup import escape
from rich.text import Text

# emoji=False: rich would otherwise replace ":smile:" anywhere in the text,
# table cells included, and markup escaping does not cover emoji codes.
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)

# An error line longer than this keeps its head and tail.
MAX_LINE = 2000


def shown(text: object) -> str:
    r"""``text`` ready for rich markup: control characters as visible escapes, markup literal.

    Non-printable characters (C0 and C1 controls, DEL, line and paragraph
    separators, bidi overrides) are written as Python writes them in a
    string literal; ``[`` that could open a tag is escaped for rich.

    >>> print(shown("a\x1b[2J[bold]\n:smile:"))
    a\x1b[2J\[bold]\n:smile:
    """
    s = str(text)
    return escape("".join(c if c.isprintable() else ascii(c)[1:-1] for c in s))


def cell(text: object) -> Text:
    """``shown(text)`` as a rich ``Text``: prints literally on any console, a caller's own included."""
    return Text.from_markup(shown(text), emoji=False)


def print_error(text: str) -> None:
    """``error: text`` on stderr, always one line.

    Names inside the message come from strangers' files: they are escaped
    with ``shown`` (so a newline in a name prints as ``\\n`` and cannot start
    a second line), and the length is bounded.
    """
    text = text.strip()
    if len(text) > MAX_LINE:
        text = text[:1200] + " ... " + text[-600:]
    err.print(f"[red]error:[/] {shown(text)}", soft_wrap=True, emoji=False)


def human(n: float) -> str:
    """Bytes for people: ``human(1_500_000)`` is ``'1.50 MB'``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def fmt(x: float | None, digits: int = 4) -> str:
    """Sigma-style numbers: fixed decimals, scientific when tiny, '-' when absent."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if x != 0 and abs(x) < 10 ** -(digits - 1):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"
