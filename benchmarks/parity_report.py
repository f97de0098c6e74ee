"""The parity report as tables: one row per artifact and split (in the spirit of Ultralytics'
benchmark table), plus a per-class recall view of what changed against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marsvision.benchmarks.conditions import source_words
from marsvision.benchmarks.parity import LIMITED
from marsvision.benchmarks.report import fmt, markdown_table, text_table, write_json, write_text

HEADERS = [
    "artifact",
    "backend",
    "status",
    "size MiB",
    "split",
    "n",
    "acc %",
    "d acc",
    "bal acc %",
    "F1 %",
    "agree %",
    "max|dp|",
    "ms/img",
    "img/s",
    "verdict",
]


def headers(report: dict[str, Any]) -> list[str]:
    """The main table's column names: F1 is the Rover class's, or msl25's macro average."""
    return [h if h != "F1 %" or report["task"] == "binary" else "macro F1 %" for h in HEADERS]


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """The main table's cells."""
    out = []
    for row in report["rows"]:
        status = row["status"] if len(row["status"]) <= 60 else row["status"][:57] + "..."
        if not row["splits"]:
            out.append(
                [row["artifact"], fmt(row["backend"]), status, fmt(row["size_mib"], 1)]
                + ["-"] * (len(HEADERS) - 5)
                + [row["verdict"]]
            )
            continue
        for split, f in row["splits"].items():
            is_ref = row["verdict"] == "reference"
            verdict = "reference" if is_ref else ("pass" if f.get("passed") else "FAIL")
            out.append(
                [
                    row["artifact"],
                    fmt(row["backend"]),
                    status,
                    fmt(row["size_mib"], 1),
                    split,
                    str(f["n"]),
                    fmt(f["accuracy"]),
                    "-" if is_ref else _signed(f["accuracy_change"]),
                    fmt(f["balanced_accuracy"]),
                    fmt(f["f1"]),
                    fmt(f["top1_agreement"]),
                    "-" if is_ref else f"{f['max_prob_diff']:.2e}",
                    fmt(f["ms_per_image"]),
                    fmt(f["images_per_s"], 1),
                    verdict,
                ]
            )
    return out


def _per_class_markdown(report: dict[str, Any]) -> str:
    """Per split: each class's PyTorch recall and every artifact's change; the losers listed."""
    ref = report["rows"][0]
    arts = [r for r in report["rows"][1:] if r["splits"]]
    parts = []
    for split in ref["splits"]:
        headers = ["class", "n", "PyTorch recall %"] + [a["flavour"] for a in arts]
        rows = []
        for c, name in enumerate(report["class_names"]):
            first = arts[0]["splits"][split]["per_class"][c] if arts else None
            n = first["n_true"] if first else None
            rec = ref["splits"][split]["per_class_recall"][c]
            cells = [name, fmt(n), "-" if rec is None else fmt(100.0 * rec)]
            cells += [_signed(a["splits"][split]["per_class"][c]["change"]) for a in arts]
            rows.append(cells)
        parts.append(f"### Per-class recall, {split} split (change in points vs PyTorch)\n")
        parts.append(markdown_table(headers, rows) + "\n")
        for a in arts:
            lost = [
                f"{pc['class']} ({pc['change']:+.2f})"
                for pc in a["splits"][split]["per_class"]
                if pc["change"] is not None and pc["change"] < 0
            ]
            parts.append(
                f"- {a['artifact']}: "
                + (("loses recall on " + ", ".join(lost)) if lost else "no class loses recall")
            )
        parts.append("")
    return "\n".join(parts)


def _partial_scopes(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(split, what was scored) where not simply all of the split (reports before: none)."""
    return [(k, v) for k, v in report.get("scopes", {}).items() if v != "all"]


def render_text(report: dict[str, Any]) -> str:
    """The terminal table plus a one-line summary of failures."""
    lines = [f"{split}: {scope}" for split, scope in _partial_scopes(report)]
    lines.append(text_table(headers(report), table_rows(report)))
    return "\n".join([*lines, *_verdicts(report)])


def _verdicts(report: dict[str, Any]) -> list[str]:
    """A line per reason an artifact failed, or was skipped where the table cuts it short, and
    the summary line (the markdown report had none of them: its FAIL rows said not why)."""
    lines = []
    for row in report["rows"]:
        for f in row.get("failures", []):
            lines.append(f"FAIL {row['artifact']}: {f}")
        if row["status"].startswith("skipped") and len(row["status"]) > 60:
            lines.append(f"{row['artifact']}: {row['status']}")
    if report["failed"]:
        summary = f"{len(report['failed'])} artifact(s) FAIL: {', '.join(report['failed'])}"
    elif report["passed"] and any(LIMITED in scope for _, scope in _partial_scopes(report)):
        summary = f"all artifacts pass on part of a split {LIMITED}: not a check of the whole split"
    elif report["passed"]:
        summary = "all artifacts pass"
    else:  # none failed, none compared: every artifact was skipped
        summary = "no artifact was compared (every one was skipped): nothing shown to pass"
    lines.append(f"parity: {summary}")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown: conditions, thresholds, main table, per-class view."""
    c = report["conditions"]
    t = report["thresholds"]
    gpu = c["gpu"]["name"] if c.get("gpu") else "none"
    return "\n".join(
        [
            f"# Parity: {report['task']} task, checkpoint sha256 "
            f"{report['checkpoint_sha256'][:12]}",
            "",
            f"Machine `{c['machine']}` ({c['cpu']['model']}, {c['cpu']['usable_cores']} usable "
            f"cores; GPU {gpu}), {c['date']}. "
            + (
                "ONNX Runtime INT8 in exact u8u8 sums (a CPU without VNNI: its u8s8 sums "
                "would saturate). "
                if c.get("onnxruntime_exact_int8")
                else ""
            )
            + "Versions: "
            + ", ".join(f"{k} {v}" for k, v in sorted(c["versions"].items()))
            + source_words(c),
            "",
            (
                f"Thresholds: FP32 top-1 agreement >= {t['fp32_min_agreement']:g}%; FP16 |accuracy "
                f"change| <= {t['fp16_max_accuracy_change']:g} points and agreement >= "
                f"{t['fp16_min_agreement']:g}%; INT8 |accuracy change| <= "
                f"{t['int8_max_accuracy_change']:g} points and agreement >= "
                f"{t['int8_min_agreement']:g}%. ms/img is model time (batch "
                f"{report['config']['batch_size']}), preprocessing excluded. {_label_rule(report)}"
            ),
            "",
            *[f"Images of {split}: {scope}.\n" for split, scope in _partial_scopes(report)],
            markdown_table(headers(report), table_rows(report)),
            "",
            *[f"- {line}" for line in _verdicts(report)],
            "",
            _per_class_markdown(report),
        ]
    )


def _label_rule(report: dict[str, Any]) -> str:
    """How every row's labels were given (the agreement and the accuracy follow it)."""
    t = report.get("decision_threshold")  # reports from before it was written: argmax
    if t is None:
        return "Labels: the most probable class."
    names = report["class_names"]
    return f"Labels: {names[1]} where P({names[1]}) >= {float(t)!r}, else {names[0]}."


def write_parity(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """parity-<machine>-<date>.json and .md in `out`."""
    c = report["conditions"]
    stem = f"parity-{report['task']}-{c['machine']}-{c['date'][:19].replace(':', '')}"
    j = write_json(out / f"{stem}.json", report)
    m = write_text(out / f"{stem}.md", render_markdown(report) + "\n")
    return j, m
