"""`mars-bench`: `speed` (throughput/latency vs PyTorch), `parity` (accuracy vs PyTorch) and
`score` (a model's metrics on an MSL split, from mars-infer's own result file).

Results (JSON, markdown, PNG) go to --out; the table goes to stdout; progress to stderr.
`parity` exits with code 3 (PARITY_FAIL_EXIT) when an artifact fails its thresholds or none
could be compared (every one skipped), `score` with the same code when a --require is not met,
`speed` when a measurement failed or none but the PyTorch baseline's was made (every other row
skipped); the result files are written all the same.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from marsvision.benchmarks.parity import ParityConfig
from marsvision.benchmarks.speed import SpeedConfig
from marsvision.runtime.backends.onnxruntime import no_telemetry
from marsvision.runtime.errors import (
    MarsvisionError,
    echo_result,
    flags_given,
    interruptible,
    option_values,
    out_of_room,
    require_extra,
)
from marsvision.runtime.files import check_writable_folder
from marsvision.runtime.models import default_exports_dir
from marsvision.train.data import SPLITS, VAL_HALVES

DEFAULT_OUT = Path("runs/bench")
# the run configs' defaults, the one place they are written
_SPEED = SpeedConfig(checkpoint=Path("."))
_PARITY = ParityConfig(checkpoint=Path("."), artifacts=Path("."), data_dir=Path("."))


def _joined(values: Sequence[object]) -> str:
    return ",".join(map(str, values))


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _csv(flag: str, value: str | None, kind: type = str) -> tuple:
    """'1,8,32' -> (1, 8, 32), each item once ('8,1,8' -> (8, 1): a repeat ran its rows again);
    a bad item is a user error naming the flag."""
    if value is None:
        return ()
    values = []
    for v in (v.strip() for v in value.split(",")):
        if not v:
            continue
        try:
            values.append(kind(v))
        except ValueError:
            raise MarsvisionError(
                f"{flag} {value!r}: {v!r} is not {'a whole number' if kind is int else 'valid'}"
                " (a comma-separated list)"
            ) from None
    return tuple(dict.fromkeys(values))


def _keep_and_show(write: Callable[[], Sequence[Path]], table: str, out: Path) -> None:
    """Write a command's result files, then print its table: a stdout that failed first (a
    reader that left, `| true`) lost the files. Where the files cannot be written (a full
    disk), the table is still printed before the error."""
    try:
        with out_of_room(out):
            written = write()
    except MarsvisionError:
        echo_result(table)
        raise
    echo_result(table)
    for p in written:
        _log(f"wrote {p}")


def _checkpoint(checkpoint: Path | None, artifacts: Path | None) -> Path:
    """--checkpoint, else the source checkpoint named in the artifacts' manifest.json."""
    from marsvision.benchmarks.artifacts import find_artifacts, read_manifest
    from marsvision.runtime.metadata import sha256_file

    if artifacts is not None and not artifacts.exists():  # before the checkpoint is loaded
        raise MarsvisionError(f"--artifacts {artifacts}: no such directory (a mars-export --out)")
    if artifacts is not None and artifacts.is_file():
        raise MarsvisionError(
            f"--artifacts {artifacts} is a file, not an export: pass the folder mars-export "
            "wrote (its --out)"
        )
    named = "names none"  # the checkpoint the artifacts' manifest.json names
    if checkpoint is None and artifacts is not None:
        find_artifacts(artifacts)  # no folder, or none of an export's: not "needs --checkpoint"
        manifest = read_manifest(artifacts) or {}
        source = manifest.get("source_checkpoint")
        if source and Path(source).is_file():
            checkpoint = Path(source)
            want = manifest.get("source_checkpoint_sha256")
            if want and sha256_file(checkpoint) != want:
                raise MarsvisionError(
                    f"{checkpoint}, the checkpoint the artifacts in {artifacts} were exported "
                    "from, has changed since (its sha256 differs from manifest.json's); export "
                    "it again into a new --out (mars-export refuses a folder of another model's "
                    "artifacts), or pass the original with --checkpoint PATH"
                )
        if source:
            named = f"names {source}, which is no file here"
    if checkpoint is None:
        raise MarsvisionError(
            "the PyTorch reference needs --checkpoint PATH ("
            + (f"the artifacts' manifest.json {named})" if artifacts else
               "or --artifacts DIR, an export whose manifest.json names its checkpoint)")
        )  # fmt: skip
    if checkpoint.is_dir():
        from marsvision.train.checkpoint import folder_refusal

        raise folder_refusal(checkpoint)
    if not checkpoint.is_file():
        raise MarsvisionError(f"--checkpoint {checkpoint}: no such file (a mars-train checkpoint)")
    return checkpoint


def _resolve_device(device: str) -> str:
    """auto -> cuda when nvidia-smi sees a GPU, else cpu; cuda without one is a user error."""
    if device == "cpu":
        return device
    from marsvision.benchmarks.conditions import gpu_info

    has_gpu = gpu_info() is not None
    if device == "cuda" and not has_gpu:
        raise MarsvisionError("--device cuda: no NVIDIA GPU here (nvidia-smi finds none); use cpu")
    return "cuda" if has_gpu else "cpu"


def _e2e_images(images: str, data: str | None, count: int) -> tuple[str, ...]:
    """--images: a folder of image files (those mars-infer would classify in it), or a split name
    (read from the MSL data)."""
    from marsvision.runtime.inputs import folder_images
    from marsvision.train.data import read_split, resolve_data_dir

    if Path(images).is_dir():
        files = folder_images(images)
        if not files:
            raise MarsvisionError(f"--images {images}: no image files in it")
        return tuple(files[:count])
    if images in SPLITS:
        try:
            data_dir = resolve_data_dir(data)
        except MarsvisionError as e:  # the default --images test needs the MSL data
            raise MarsvisionError(
                f"{e.message}; or time end to end on a folder of your own images: --images DIR"
            ) from None
        samples = read_split(data_dir, images, "binary", limit=count)
        return tuple(str(s.path) for s in samples)
    raise MarsvisionError(
        f"--images {images!r}: neither a folder nor one of the splits {', '.join(SPLITS)}"
    )


class _Interruptible(click.Group):
    """Each command runs under `interruptible`: Ctrl-C exits 130 (click said "Aborted!", exit
    1), SIGTERM 143 and SIGHUP 129 with the cleanups run, where they killed speed's runner and
    left its measuring process running; a reader of its output that left, 141."""

    def invoke(self, ctx: click.Context) -> object:
        with interruptible("mars-bench"):
            return super().invoke(ctx)


# On each command too: a subcommand's context made on its own (as a test reading a card's
# commands makes one) took click's default, --help alone, and cached it on the command object.
_HELP = {"help_option_names": ["-h", "--help"]}


@click.group(cls=_Interruptible, context_settings=_HELP)
def main() -> None:
    """Benchmark marsvision models: speed and accuracy parity against PyTorch, and scores of
    mars-infer result files on the official MSL splits or on your own labelled images."""
    no_telemetry()


_device = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
_threads = click.option(  # mars-infer's range: -1 made error rows, 0 meant all cores
    "--threads",
    type=click.IntRange(1, 256),
    default=None,
    help="CPU threads (default: all usable cores).",
)
_out = click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=DEFAULT_OUT,
    show_default=True,
    help="Results folder.",
)
_data = click.option("--data", default=None, help="MSL data folder (default: $MARS_DATA).")


def _bar(name: str, help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A parity threshold's option: `--<name>`, a float, defaulting to `Thresholds`' value."""
    return click.option(
        "--" + name.replace("_", "-"),
        type=float,
        default=getattr(_PARITY.thresholds, name),
        show_default=True,
        help=help,
    )


@main.command(context_settings=_HELP)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="The PyTorch checkpoint (the eager baseline) [default: the manifest's source].",
)
@click.option(
    "--artifacts",
    type=click.Path(path_type=Path),
    default=None,
    help="An export out dir (manifest.json and the artifacts) [default, without --checkpoint: "
    "$MARS_EXPORTS, else exports, where it exists].",
)
@click.option("--batch-sizes", default=_joined(_SPEED.batch_sizes), show_default=True)
@click.option(
    "--precisions",
    default=None,
    help="fp32,fp16,bf16,int8-cpu,int8-trt,int8 [default: cpu fp32,int8-cpu; "
    "cuda fp32,fp16,bf16,int8].",
)
@click.option(
    "--backends",
    default=None,
    help="pytorch,pytorch-cl,onnxruntime,tensorrt [default: cpu pytorch,onnxruntime; cuda all].",
)
@click.option(
    "--modes",
    default=_joined(_SPEED.modes),
    show_default=True,
    help="model (preallocated input) and/or e2e (image files in, predictions out).",
)
@click.option(
    "--images",
    default="test",
    show_default=True,
    help="End-to-end inputs: a folder of images or an MSL split name.",
)
@click.option(
    "--num-images",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="At most this many end-to-end images (cycled through).",
)
@click.option(
    "--data",
    default=None,
    help="MSL data folder of an --images split name, e2e only (default: $MARS_DATA).",
)
@click.option("--warmup", type=int, default=_SPEED.warmup, show_default=True)
@click.option(
    "--repeats",
    type=int,
    default=_SPEED.repeats,
    show_default=True,
    help="Timed calls of each row (p90 is reported from 10, p99 from 100; max always).",
)
@_device
@_threads
@click.option(
    "--isolate/--in-process",
    default=_SPEED.isolate,
    show_default=True,
    help="Run each row in its own process (its own peak RSS).",
)
@click.option(
    "--baseline/--no-baseline",
    default=_SPEED.baseline,
    show_default=True,
    help="Time PyTorch eager FP32 too, the rows' ratios (torch and the checkpoint); "
    "--no-baseline: the exported files alone, on a runtime-only install.",
)
@_out
def speed(
    checkpoint: Path | None,
    artifacts: Path | None,
    batch_sizes: str,
    precisions: str | None,
    backends: str | None,
    modes: str,
    images: str,
    num_images: int,
    data: str | None,
    warmup: int,
    repeats: int,
    device: str,
    threads: int | None,
    isolate: bool,
    baseline: bool,
    out: Path,
) -> None:
    """Throughput and latency of each backend x precision x batch, vs PyTorch eager FP32 (not
    with --no-baseline); exit 3 when a measurement failed (an error row) or all asked for beside
    the baseline was skipped."""
    from marsvision.benchmarks.speed import BASELINE, SPEED_FAIL_EXIT, SpeedConfig, run_speed
    from marsvision.benchmarks.speed_report import render_text, write_speed

    if baseline:
        require_extra("mars-bench speed", "train", "torch", "torchvision")  # its baseline
    check_writable_folder(out, "--out")  # before the run, not after it
    if checkpoint is None and artifacts is None and default_exports_dir().is_dir():
        artifacts = default_exports_dir()  # where mars-export writes and mars-infer looks
    if baseline:
        checkpoint = _checkpoint(checkpoint, artifacts)
    with option_values():  # every value first: exit 2 with or without the data or a GPU
        cfg = SpeedConfig(
            checkpoint=checkpoint,
            artifacts=artifacts,
            batch_sizes=_csv("--batch-sizes", batch_sizes, int),
            precisions=_csv("--precisions", precisions) or None,
            backends=_csv("--backends", backends) or None,
            modes=_csv("--modes", modes),
            warmup=warmup,
            repeats=repeats,
            threads=threads,
            isolate=isolate,
            baseline=baseline,
        )
        unused = flags_given("images", "num_images", "data")
        if unused and "e2e" not in cfg.modes:  # they did nothing, unchecked
            flags = " and ".join(unused)
            raise MarsvisionError(
                f"{flags} choose the end-to-end images, which --modes {','.join(cfg.modes)} does "
                "not measure: add e2e to --modes"
            )
    cfg = dataclasses.replace(
        cfg,
        images=_e2e_images(images, data, num_images) if "e2e" in cfg.modes else (),
        device=_resolve_device(device),
    )
    report = run_speed(cfg, log=_log)
    _keep_and_show(lambda: write_speed(report, out), render_text(report), out)
    rows = report["rows"]
    failed = sum(r["status"].startswith("error") for r in rows)
    # the PyTorch baseline always runs: it alone, where other rows were asked for, is nothing
    asked = [r for r in rows if (r["backend"], r["precision"]) != BASELINE]
    skipped = len(report["skipped"]) + sum(r["status"].startswith("skipped") for r in rows)
    if failed:
        _log(f"speed: {failed} of {len(rows)} measurements failed (their error rows above)")
        sys.exit(SPEED_FAIL_EXIT)
    if skipped and not any(r["status"] == "ok" for r in asked):
        _log("speed: nothing was measured but the PyTorch baseline (every other row skipped)"
             if rows else "speed: nothing was measured (every row skipped)")  # fmt: skip
        sys.exit(SPEED_FAIL_EXIT)


@main.command(context_settings=_HELP)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="The PyTorch checkpoint the artifacts came from (the reference) "
    "[default: the manifest's source].",
)
@click.option(
    "--artifacts",
    type=click.Path(path_type=Path),
    default=default_exports_dir,
    show_default="$MARS_EXPORTS, else exports",
    help="An export out dir (manifest.json and the artifacts): where mars-export writes and "
    "mars-infer looks.",
)
@_data
@click.option("--splits", default=_joined(_PARITY.splits), show_default=True)
@click.option("--limit", type=int, default=None, help="At most N images per split (quick runs).")
@click.option("--batch-size", type=int, default=_PARITY.batch_size, show_default=True)
@_device
@_threads
@_bar("fp32_min_agreement", "FP32: least top-1 agreement with PyTorch, percent.")
@_bar("fp16_max_accuracy_change", "FP16: largest |accuracy change|, points.")
@_bar("fp16_min_agreement", "FP16: least top-1 agreement with PyTorch, percent.")
@_bar("int8_max_accuracy_change", "INT8: largest |accuracy change|, points.")
@_bar("int8_min_agreement", "INT8: least top-1 agreement with PyTorch, percent.")
@_out
def parity(
    checkpoint: Path | None,
    artifacts: Path,
    data: str | None,
    splits: str,
    limit: int | None,
    batch_size: int,
    device: str,
    threads: int | None,
    fp32_min_agreement: float,
    fp16_max_accuracy_change: float,
    fp16_min_agreement: float,
    int8_max_accuracy_change: float,
    int8_min_agreement: float,
    out: Path,
) -> None:
    """Accuracy of every artifact vs the PyTorch checkpoint; exit 3 when one fails, or when
    every one was skipped (TensorRT engines without TensorRT)."""
    from marsvision.benchmarks.parity import PARITY_FAIL_EXIT, ParityConfig, Thresholds, run_parity
    from marsvision.benchmarks.parity_report import render_text, write_parity
    from marsvision.train.data import resolve_data_dir

    require_extra("mars-bench parity", "train", "torch", "torchvision")  # its PyTorch reference
    check_writable_folder(out, "--out")  # before the run, not after it
    source, data_dir = _checkpoint(checkpoint, artifacts), resolve_data_dir(data)
    on = _resolve_device(device)
    with option_values():
        cfg = ParityConfig(
            checkpoint=source,
            artifacts=artifacts,
            data_dir=data_dir,
            splits=_csv("--splits", splits),
            limit=limit,
            batch_size=batch_size,
            device=on,
            threads=threads,
            thresholds=Thresholds(
                fp32_min_agreement=fp32_min_agreement,
                fp16_max_accuracy_change=fp16_max_accuracy_change,
                fp16_min_agreement=fp16_min_agreement,
                int8_max_accuracy_change=int8_max_accuracy_change,
                int8_min_agreement=int8_min_agreement,
            ),
        )
    report = run_parity(cfg, log=_log)
    _keep_and_show(lambda: write_parity(report, out), render_text(report), out)
    if not report["passed"]:
        sys.exit(PARITY_FAIL_EXIT)


def _labels_data(data: str | None) -> Path | None:
    """The MSL data folder beside --labels, needed only for an msl25 --top-k file's class
    names: --data as given (checked), else $MARS_DATA where it is one (a stale setting is no
    reason to refuse a binary model's score), else None."""
    from marsvision.train.data import resolve_data_dir

    if data is not None:
        return resolve_data_dir(data)
    try:
        return resolve_data_dir(None)
    except MarsvisionError:  # not set, or not a data folder
        return None


_SCORE_HELP = """Metrics of a model on an MSL split, or on your own labelled images (--labels),
recomputed from PREDICTIONS: the result file that mars-infer wrote (CSV or JSONL, sniffed from
its first character; every probability or --top-k; - reads stdin: mars-infer ... --out - |
mars-bench score -). The task and class names come from the file.

Rows are matched to the split's images by file name (the paths may be relative, absolute or
through links); rows for other images are ignored and counted. Every image of the split needs
exactly one row with status ok, unless --allow-missing (then the rest are scored and the
coverage is shown, and a --require fails: it holds for the whole split). Metrics of the model's
decision (the `label` column: the most probable class, or for a binary model with a decision
threshold, Rover where P(Rover) reaches it) with 95% bootstrap intervals (1000 resamples, seed
0); binary: precision, recall and F1 of Rover, msl25: macro averages and each class's. Writes
score-<split>-<model sha256[:12]>-<backend>[-tta-flip][-top-k][-partial-<file sha256[:8]>].json
to --out (score-val-held-... with --val-half held, score-labels-<name>-<its sha256[:8]>-... with
--labels; -top-k for a --top-k file; -partial-... where --allow-missing left images out, with
the predictions file's sha256).

--labels scores images that are not an MSL split (Perseverance's, your own sort): a CSV file
whose header names a path and a label column (a mars-infer CSV with its labels corrected is
one), and optionally a group column (images that err together: a sol, a sequence; the second
interval resamples whole groups; without one, the sols of MSL product names, other images one
by one), or a folder with one subfolder per class (Surface/, Rover/), images anywhere below
each. Labels are the model's class names; --data is then needed only for an msl25 --top-k
file whose run record (FILE.run.json, mars-infer's) no longer leads to the model that wrote it
(the class names are the model's).

\b
Exit codes:
  0  scored (and every --require met)
  1  user error (unreadable file, wrong classes, mixed models, missing rows)
  2  usage error (bad option, unknown metric in --require)
  3  a --require is not met
"""


@main.command(help=_SCORE_HELP, context_settings=_HELP)
@click.argument("predictions", type=click.Path(path_type=Path, allow_dash=True))  # unreadable: 1
@_data
@click.option(
    "--split",
    type=click.Choice(SPLITS),
    default="test",
    show_default=True,
)
@click.option(
    "--val-half",
    type=click.Choice(VAL_HALVES),
    default=None,
    help="With --split val, score one half of val by sol: held (the half a model trained with "
    "--train-on train+half-val was selected on: its val) or trained (the half it learned from).",
)
@click.option(
    "--train-limit",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="With --val-half: the --limit of that model's mars-train run, which halved only its "
    "first N val images (its model card's command gives it); the held half is the rest of val "
    "from sols it did not train on.",
)
@click.option(
    "--labels",
    type=click.Path(path_type=Path),  # unreadable: 1
    default=None,
    metavar="CSV|DIR",
    help="Score against your own labelled images instead of a split: a CSV with path and label "
    "columns (group optional), or a folder with a subfolder per class.",
)
@click.option(
    "--allow-missing",
    is_flag=True,
    help="Score the images that have one ok row; report the missing, failed and duplicated.",
)
@click.option(
    "--require",
    default=None,
    metavar="METRIC=MIN,...",
    help="Least values, as fractions, of accuracy, balanced_accuracy, precision, recall, f1 "
    "(e.g. accuracy=0.98,f1=0.98); exit 3 when one is not met.",
)
@_out
def score(
    predictions: Path,
    data: str | None,
    split: str,
    val_half: str | None,
    train_limit: int | None,
    labels: Path | None,
    allow_missing: bool,
    require: str | None,
    out: Path,
) -> None:
    from marsvision.benchmarks.score import (
        SCORE_FAIL_EXIT,
        ScoreConfig,
        parse_requirements,
        render_text,
        run_score,
        write_score,
    )
    from marsvision.train.data import resolve_data_dir

    try:
        requirements = parse_requirements(require)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--require") from None
    if labels is not None and flags_given("split", "val_half"):
        raise click.BadParameter(
            "your own labelled images are scored instead of a split: not with --split or "
            "--val-half",
            param_hint="--labels",
        )
    if val_half and split != "val":
        raise click.BadParameter(f"a half of val: needs --split val, not {split}",
                                 param_hint="--val-half")  # fmt: skip
    if train_limit is not None and not val_half:
        raise click.BadParameter("how a model halved val: needs --val-half",
                                 param_hint="--train-limit")  # fmt: skip
    check_writable_folder(out, "--out")  # before the run, not after it
    cfg = ScoreConfig(
        predictions=predictions,
        data_dir=resolve_data_dir(data) if labels is None else _labels_data(data),
        split=split,
        val_half=val_half,
        train_limit=train_limit,
        labels=labels,
        allow_missing=allow_missing,
        requirements=requirements,
    )
    report = run_score(cfg)
    _keep_and_show(lambda: [write_score(report, out)], render_text(report), out)
    if not report["passed"]:
        sys.exit(SCORE_FAIL_EXIT)


if __name__ == "__main__":
    main()
