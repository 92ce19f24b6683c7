"""Plain-text tables and number formats shared by `dsg inspect`, `dsg demo` and `dsg compare`."""

from __future__ import annotations


def _row(cells, widths) -> str:
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def table(header: list[str], rows: list[list]) -> str:
    """Left-aligned first column, right-aligned others, a dashed rule under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [_row(header, widths), _row(["-" * w for w in widths], widths)]
    return "\n".join(lines + [_row(r, widths) for r in rows])


def pct(x) -> str:
    """A share as a percentage with one decimal, "-" for None."""
    return "-" if x is None else f"{100 * x:.1f}"


def printable(text: str) -> str:
    """`text` with control characters (terminal escape sequences among them) shown as escapes, newlines kept:
    names and paths read from files must not drive the user's terminal."""
    return "".join(c if c == "\n" or (c.isprintable() or c == "\t") else repr(c)[1:-1] for c in text)
