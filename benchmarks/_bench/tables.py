"""Markdown tables, the one way the scripts write them."""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence


def markdown(header: Sequence[str], rows: Iterable[Sequence], align: str = "") -> str:
    """A markdown table: `header`, then a line per row; cells as given (None as "-", anything
    else as str()). `align` has one letter per column, "l" or "r" (right: `---:`), default "l"."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_sd(values: Sequence[float], digits: int = 2) -> str:
    """"mean ± sd" (the sample standard deviation); "mean ± -" for a single value."""
    sd = f"{statistics.stdev(values):.{digits}f}" if len(values) > 1 else "-"
    return f"{statistics.mean(values):.{digits}f} ± {sd}"


def span(values: Sequence[float], digits: int = 2) -> str:
    """"min-max" of the values."""
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"
