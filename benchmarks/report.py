"""Writers for benchmark results: aligned text tables, markdown tables, JSON, PNG charts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from marsvision.runtime.files import atomic_path, atomic_write_text

Cell = str | int | float | None


def fmt(value: Cell, digits: int = 2) -> str:
    """One table cell: floats to `digits` decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned table for the terminal: text left, numbers right."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def numeric(s: str) -> bool:
        return (
            s.replace(".", "", 1).replace("-", "", 1).replace("+", "", 1).replace("x", "").isdigit()
        )

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if numeric(c) else c.ljust(w) for c, w in zip(cells, widths)
        ).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    out = [
        "| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically (temporary name in the same folder, then rename)."""
    atomic_write_text(path, text)
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented JSON (NaN refused: results must be valid JSON)."""
    return write_text(path, json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n")


def bar_chart(
    path: Path,
    *,
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    ylabel: str,
) -> Path | None:
    """A grouped bar chart (one group per label, one bar per series) as PNG, matplotlib Agg;
    None without matplotlib (a runtime-only install: `mars-bench speed --no-baseline`), whose
    results are whole without it."""
    from importlib.util import find_spec

    if find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(series))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.35 * len(labels) * n + 2)), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        ys = [v if v is not None else 0.0 for v in values]
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # an interrupted save left a cut PNG under the name
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path
