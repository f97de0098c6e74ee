"""The speed report: a terminal table, markdown, one JSON per backend x precision, a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marsvision.benchmarks.conditions import source_words
from marsvision.benchmarks.report import (
    bar_chart,
    fmt,
    markdown_table,
    text_table,
    write_json,
    write_text,
)
from marsvision.benchmarks.speed import BASELINE
from marsvision.benchmarks.timing import LEAST_CALLS

HEADERS = [
    "mode",
    "backend",
    "precision",
    "batch",
    "img/s",
    "mean ms",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "x pt-fp32",
    "peak RSS MiB",
    "GPU MiB",
    "status",
]


# a row whose calls' standard deviation is over this fraction of their mean is marked noisy:
# most rows of calm runs here keep under 0.06; runs beside other work reached 0.2-0.5, their
# ratios 10x off. End-to-end rows vary with the images' sizes too (a folder of unlike images)
NOISY_CV = 0.10


def _noisy(r: dict[str, Any]) -> float | None:
    """The coefficient of variation of an ok row's calls where it is over NOISY_CV."""
    t = r.get("timing") or {}
    if r["status"] != "ok" or not t.get("mean_ms"):
        return None
    cv = t["std_ms"] / t["mean_ms"]
    return cv if cv > NOISY_CV else None


def _noisy_baselines(rows: list[dict[str, Any]]) -> dict[tuple[Any, Any], float]:
    """(mode, batch) -> the CV of the PyTorch FP32 row there, where that row is noisy: every
    ratio at that mode and batch is divided by it."""
    return {
        (r["mode"], r["batch"]): cv
        for r in rows
        if (r.get("backend"), r.get("precision")) == BASELINE and (cv := _noisy(r)) is not None
    }


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One line per measured row, then one per pair that could not run."""
    out = []
    noisy_base = _noisy_baselines(report["rows"])
    for r in report["rows"]:
        ok = r["status"] == "ok"
        t = r.get("timing", {}) if ok else {}
        speedup = r.get("speedup_vs_pytorch_fp32")
        status = r["status"] if len(r["status"]) <= 70 else r["status"][:67] + "..."
        if (cv := _noisy(r)) is not None:
            other = r.get("other_work_cpu_share")
            why = f"; other work {other:.0%} of the CPUs" if other else ""
            status = f"ok, noisy (CV {cv:.0%}{why})"
        elif speedup is not None and (cv := noisy_base.get((r["mode"], r["batch"]))) is not None:
            status = f"ok, its ratio noisy (the baseline's CV {cv:.0%})"
        out.append(
            [
                r["mode"],
                r.get("runner", r["backend"]) if ok else r["backend"],
                r["precision"],
                str(r["batch"]),
                fmt(r.get("throughput_img_s"), 1),
                fmt(t.get("mean_ms")),
                fmt(t.get("p50_ms")),
                fmt(t.get("p90_ms")),
                fmt(t.get("p99_ms")),
                fmt(t.get("max_ms")),
                "-" if speedup is None else f"{speedup:.2f}x",
                fmt(r.get("peak_rss_mib"), 0),
                fmt(r.get("gpu_mem_mib"), 0),
                status,
            ]
        )
    for s in report["skipped"]:
        out.append(["-", s["backend"], s["precision"], "-"] + ["-"] * 9 + [s["status"]])
    return out


def _conditions_line(report: dict[str, Any]) -> str:
    c = report["conditions"]
    cfg = report["config"]
    gpu = f"{c['gpu']['name']} (driver {c['gpu']['driver']})" if c.get("gpu") else "no GPU"
    sizes = sorted({r["input_size"] for r in report["rows"] if r.get("input_size")})
    isa = " ".join(c["cpu"].get("isa") or ()) or "no ISA of note"
    if c.get("onnxruntime_exact_int8"):
        isa += "; ONNX Runtime INT8 in exact u8u8 sums"
    load = c.get("load_average_before")
    return (
        f"machine {c['machine']}: {c['cpu']['model']} ({isa}), "
        f"{c['cpu']['usable_cores']} usable of {c['cpu']['logical_cores']} cores, {gpu}"
        + (f", load {load[0]:.2f} before the first row" if load else "")
        + "; "
        f"device {cfg['device']}, threads "
        f"{c['threads']}; input {'/'.join(map(str, sizes)) or '?'} px; warm-up {cfg['warmup']}, "
        f"repeats {cfg['repeats']}"
        + (
            f" (p90 from {LEAST_CALLS[90]} calls, p99 from {LEAST_CALLS[99]})"
            if cfg["repeats"] < LEAST_CALLS[99]
            else ""
        )
        + "; "
        + ("" if cfg.get("isolate", True) else "in one process (peak RSS: the running peak); ")
        + (
            f"onnxruntime sessions: {so['intra_op_num_threads']} intra-op threads, "
            f"{so['inter_op_num_threads']} inter-op, "
            f"{'spinning' if so['allow_spinning'] else 'no spinning'}, "
            f"{so['graph_optimization_level']}; "
            if (so := c.get("onnxruntime_session"))
            else ""
        )
        + ", ".join(f"{k} {v}" for k, v in sorted(c["versions"].items()))
        + source_words(c)
    )


def _noise_note(report: dict[str, Any]) -> str:
    """A line under the table where some row is noisy (empty otherwise)."""
    if not any(_noisy(r) is not None for r in report["rows"]):
        return ""
    return (
        f"noisy: its calls' standard deviation is over {NOISY_CV:.0%} of their mean (CV), as "
        "when other work shares the CPU or GPU (or, end to end, images of unlike sizes); its "
        "figures, and ratios made with it (a row whose ratio is to a noisy PyTorch FP32 row "
        "says so), are not ones to quote: rerun on a quiet machine"
    )


def render_text(report: dict[str, Any]) -> str:
    """Conditions line plus the table (and the noisy rows' note)."""
    note = _noise_note(report)
    return (
        _conditions_line(report)
        + "\n"
        + text_table(HEADERS, table_rows(report))
        + (f"\n{note}" if note else "")
    )


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown."""
    return "\n".join(
        [
            "# Speed",
            "",
            _conditions_line(report),
            "",
            (
                "model = `Runner.infer` on one preallocated batch (host to host); e2e = real image "
                "files to probabilities (runtime Classifier, which decodes on its worker threads, "
                "at most 4, whatever --threads says, and a batch of 1 in the calling thread; "
                "PyTorch: Pillow + eval_transform, one image after another, as a plain script "
                "does). "
                "x pt-fp32 = throughput over PyTorch eager FP32 at the same mode and batch; "
                "the ms columns are per batch; peak RSS is each row's own process's, unless "
                "the conditions say the rows ran in one process; GPU MiB is what nvidia-smi "
                "says the row's process holds after its calls (CUDA context, caches, model; "
                "blank where it lists no process of that id, as in some containers)."
            ),
            "",
            markdown_table(HEADERS, table_rows(report)),
            *(["", note] if (note := _noise_note(report)) else []),
        ]
    )


def _stem(report: dict[str, Any]) -> str:
    c = report["conditions"]
    return f"{c['machine']}-{report['created'][:19].replace(':', '')}"


def write_speed(report: dict[str, Any], out: Path) -> list[Path]:
    """Write one JSON per backend x precision (`speed-<backend>-<precision>-<machine>-<date>.json`,
    with the conditions, config and its baseline rows), the markdown and the PNG chart."""
    stem = _stem(report)
    written = []
    pairs = sorted({(r["backend"], r["precision"]) for r in report["rows"]})
    for backend, precision in pairs:
        rows = [r for r in report["rows"] if (r["backend"], r["precision"]) == (backend, precision)]
        baseline = [
            r for r in report["rows"] if (r["backend"], r["precision"]) == ("pytorch", "fp32")
        ]
        doc = {
            "kind": "speed",
            "backend": backend,
            "precision": precision,
            "machine": report["conditions"]["machine"],
            "created": report["created"],
            "conditions": report["conditions"],
            "config": report["config"],
            "rows": rows,
            "baseline_rows": [] if (backend, precision) == ("pytorch", "fp32") else baseline,
        }
        written.append(write_json(out / f"speed-{backend}-{precision}-{stem}.json", doc))
    if report["skipped"]:
        written.append(write_json(out / f"speed-skipped-{stem}.json", report["skipped"]))
    written.append(write_text(out / f"speed-{stem}.md", render_markdown(report) + "\n"))
    chart = _speed_chart(report, out / f"speed-{stem}.png")
    if chart:
        written.append(chart)
    return written


def _chart_title(report: dict[str, Any]) -> str:
    c = report["conditions"]
    gpu = c["gpu"]["name"] if c.get("gpu") else "no GPU"
    sizes = sorted({r["input_size"] for r in report["rows"] if r.get("input_size")})
    return (
        f"Throughput, {c['machine']} ({gpu}), device {report['config']['device']}, "
        f"{c['threads']} threads, {'/'.join(map(str, sizes))} px"
    )


def _speed_chart(report: dict[str, Any], path: Path) -> Path | None:
    """Throughput per backend-precision (bars) for each mode and batch (groups)."""
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    if not ok:
        return None
    groups = sorted({(r["mode"], r["batch"]) for r in ok}, key=lambda g: (g[0] != "model", g[1]))
    names = sorted(
        {f"{r['backend']} {r['precision']}" for r in ok}, key=lambda n: (n != "pytorch fp32", n)
    )
    by = {(f"{r['backend']} {r['precision']}", r["mode"], r["batch"]): r for r in ok}
    series = {
        n: [by[(n, m, b)]["throughput_img_s"] if (n, m, b) in by else None for m, b in groups]
        for n in names
    }
    return bar_chart(
        path,
        title=_chart_title(report),
        labels=[f"{m} b{b}" for m, b in groups],
        series=series,
        ylabel="images / s",
    )
