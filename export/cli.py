"""`mars-export`: checkpoint -> ONNX FP32/FP16/INT8 (and TensorRT engines where available)."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from marsvision.export.config import CALIB_METHODS, TENSORRT_MODES, ExportConfig
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
from marsvision.runtime.metadata import sha256_file
from marsvision.runtime.models import (
    SUMS_FILE,
    changed_since_export,
    default_exports_dir,
    listed_sha256,
    shipped_name,
)

_REPO = Path(__file__).resolve().parents[1]
MODELS_ENV = "MARS_MODELS"  # folder of shipped checkpoints, instead of <repo>/models
_DEFAULTS = ExportConfig(checkpoint=Path("."), out=Path("."))


def models_dir() -> Path:
    """The folder of shipped checkpoints: $MARS_MODELS where set, else `<repo>/models`."""
    return Path(os.environ.get(MODELS_ENV) or _REPO / "models")


def _listed_otherwise(path: Path) -> str:
    """The sha256 that SHA256SUMS beside `path` lists for it, where `path`'s bytes are not
    those; '' where they are, or it lists none (the caller hashes again for its message only
    when it refuses)."""
    want = listed_sha256(path.parent / SUMS_FILE, path.name)
    return want if changed_since_export(path, want) else ""


def shipped_checkpoint(task: str = "binary") -> Path:
    """The shipped checkpoint `resnet50-<task>.pt` in `models_dir()`, refused where its bytes
    are not those SHA256SUMS beside it gives (a bit flipped in a weight loads and exports)."""
    path = models_dir() / shipped_name(task)
    if not path.is_file():
        raise MarsvisionError(
            f"no shipped {task} model at {path}; pass --checkpoint PATH (a mars-train checkpoint)"
        )
    if want := _listed_otherwise(path):
        raise MarsvisionError(
            f"{path} is not the shipped file: sha256 {sha256_file(path)[:12]}..., {SUMS_FILE} "
            f"beside it gives {want[:12]}... (damaged, or changed since it shipped); restore it "
            f"(in a clone: git -C {shlex.quote(str(path.parent))} checkout -- "
            f"{shlex.quote(path.name)}) or pass --checkpoint PATH"
        )
    return path


def listed_checkpoint(path: Path) -> Path:
    """A --checkpoint PATH, refused where a SHA256SUMS beside it lists it with other bytes: the
    shipped file named by its path (the README's way after `pip install .`) was exported with
    a bit flipped, which `shipped_checkpoint` refuses."""
    if path.is_file() and (want := _listed_otherwise(path)):
        raise MarsvisionError(
            f"{path} is not the file {SUMS_FILE} beside it lists: sha256 "
            f"{sha256_file(path)[:12]}..., listed {want[:12]}... (damaged, or changed since it "
            f"was listed); restore it, or mend its line in {SUMS_FILE} if the change is yours"
        )
    return path


@contextlib.contextmanager
def _read_back(out: Path) -> Iterator[None]:
    """A model file the export wrote and could not read back is a one-line error: onnxruntime's
    quantizer writes a copy of the model under --out and reads it again, and a disk that fills
    up there truncated it without an OSError, so the read failed in protobuf ("Wire format was
    corrupt", a traceback) where an OSError would have said "no space"."""
    try:
        yield
    except Exception as e:
        if type(e).__name__ != "DecodeError" or not type(e).__module__.startswith("google."):
            raise
        free = shutil.disk_usage(out).free / 2**20 if out.is_dir() else float("nan")
        raise MarsvisionError(
            f"a model file written under {out} could not be read back ({str(e).strip()[:80]}): "
            f"a disk that fills up truncates it without an error ({free:.0f} MiB free there "
            "now); make room, or pass another --out"
        ) from None


def _table(manifest: dict[str, Any]) -> str:
    rows = [("artifact", "precision", "size MB", "max|dlogit|", "labels agree", "build s")]
    for a in manifest["artifacts"]:
        p = a["parity_vs_fp32"]
        diff = f"{p['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in p else "-"
        agree = f"{p['top1_agreement']:.0%} of {p['images']}" if "top1_agreement" in p else "-"
        rows.append(
            (
                a["file"],
                a["precision"],
                f"{a['size_mb']:.1f}",
                diff,
                agree,
                f"{a['build_seconds']:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Export a marsvision checkpoint to ONNX (FP32 always; FP16, INT8 on request) and, "
    "where TensorRT and a GPU exist, to TensorRT engines. Writes into --out with a "
    "manifest.json; prints a summary table on stdout, progress on stderr.",
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoint from mars-train [default: the shipped resnet50-binary.pt in models/, or in "
    "$MARS_MODELS].",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=default_exports_dir,
    show_default="$MARS_EXPORTS, else exports",
    help="Output directory (mars-infer looks there for its default model).",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    envvar="MARS_DATA",
    default=None,
    help="MSL data directory: val images for parity, train images for calibration "
    "[default: $MARS_DATA].",
)
@click.option(
    "--fp16",
    is_flag=True,
    help="Also write the FP16 ONNX (float32 in/out) and, with TensorRT, the FP16 engine.",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also write INT8 Q/DQ ONNX calibrated on train images: .int8-cpu.onnx (uint8 "
    "activations: fast in ONNX Runtime on x86 CPUs) and .int8-trt.onnx (symmetric int8, for "
    "TensorRT); with TensorRT, the INT8 engine built from the latter.",
)
@click.option(
    "--calib-images",
    type=click.IntRange(min=1),
    default=_DEFAULTS.calib_images,
    show_default=True,
    help="Number of train images to calibrate INT8 on.",
)
@click.option(
    "--calib-method",
    type=click.Choice(CALIB_METHODS),
    default=_DEFAULTS.calib_method,
    show_default=True,
    help="How activation ranges are chosen from the calibration data.",
)
@click.option(
    "--int8-min-agreement",
    type=float,
    default=_DEFAULTS.int8_min_agreement,
    show_default=True,
    help=f"Refuse an INT8 file whose labels agree with PyTorch's on fewer than this percent "
    f"of {_DEFAULTS.parity_images} val images (a broken calibration; mars-bench parity judges "
    "the rest); 0: never.",
)
@click.option(
    "--tensorrt",
    type=click.Choice(TENSORRT_MODES),
    default=_DEFAULTS.tensorrt,
    show_default=True,
    help="Build engines: auto = when TensorRT and a GPU exist (else say why not), on = "
    "required (fails without), off = never.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_batch,
    show_default=True,
    help="Largest batch the TensorRT engines accept.",
)
def main(
    checkpoint: Path | None,
    out: Path,
    data: Path | None,
    fp16: bool,
    int8: bool,
    calib_images: int,
    calib_method: str,
    int8_min_agreement: float,
    tensorrt: str,
    max_batch: int,
) -> None:
    no_telemetry()
    for flag in flags_given("calib_images", "calib_method", "int8_min_agreement"):
        if not int8:  # did nothing, went to the manifest
            raise click.UsageError(f"{flag} is for the INT8 export: add --int8")
    if flags_given("max_batch"):  # ignored, then recorded
        if tensorrt == "off" or not (fp16 or int8):
            raise click.UsageError(
                "--max-batch sizes the TensorRT engines, which are built only for --fp16 or "
                "--int8 and not with --tensorrt off"
            )
    # onnxruntime comes with the cpu or gpu extra, not export: both builds cannot sit together
    modules = ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime")
    require_extra("mars-export", "export", *modules)
    from marsvision.export.pipeline import export_all
    from marsvision.runtime.files import check_writable_folder

    check_writable_folder(out, "--out")  # before the checkpoint, the data and PyTorch's run
    checkpoint = (
        listed_checkpoint(checkpoint) if checkpoint is not None else shipped_checkpoint("binary")
    )
    with option_values():  # before the checkpoint and the data are read
        config = ExportConfig(checkpoint=checkpoint, out=out, fp16=fp16, int8=int8,
                              calib_images=calib_images, calib_method=calib_method,
                              int8_min_agreement=int8_min_agreement, tensorrt=tensorrt,
                              max_batch=max_batch, data_dir=data)  # fmt: skip
    # the staging folder is removed on any of these
    with interruptible("mars-export"), out_of_room(out), _read_back(out):
        manifest = export_all(config)
    kept = len(manifest["kept"])
    wrote = len(manifest["artifacts"]) - kept
    echo_result(f"{_table(manifest)}\n\nwrote {wrote} artifact{'s' * (wrote != 1)} and "
                f"manifest.json to {out}"
                + (f" ({kept} more kept from an earlier export)" if kept else ""))  # fmt: skip


if __name__ == "__main__":
    main()
