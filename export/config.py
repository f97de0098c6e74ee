"""The export options: one typed dataclass, built from the CLI flags, holding every default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from marsvision.runtime.errors import MarsvisionError

CALIB_METHODS = ("percentile", "entropy", "minmax")
TENSORRT_MODES = ("auto", "on", "off")
TRT_INSTALL_HINT = 'pip install "marsvision[trt]"'


@dataclass(frozen=True)
class ExportConfig:
    """What `export_all` does; defaults here are the CLI's defaults."""

    checkpoint: Path
    out: Path
    fp16: bool = False
    int8: bool = False
    # Calibration: real train-split images (never val/test).
    calib_images: int = 128
    # Percentile (99.999th, 2048-bin histograms) clips the rare huge ReLU outputs that MinMax
    # lets stretch the int8 grid; entropy is as good on ResNets but several times slower to
    # compute in ONNX Runtime's Python calibrator. See the README for measured agreement.
    calib_method: str = "percentile"
    tensorrt: str = "auto"
    max_batch: int = 32
    data_dir: Path | None = None  # None: $MARS_DATA, else the default location
    parity_images: int = 8  # real val images for the FP32 parity gate and the reported figures
    parity_tolerance: float = 1e-4  # max |logit diff| of the FP32 ONNX against PyTorch

    def __post_init__(self) -> None:
        if self.calib_method not in CALIB_METHODS:
            raise MarsvisionError(
                f"unknown calibration method {self.calib_method!r}; choose one of "
                + ", ".join(CALIB_METHODS)
            )
        if self.tensorrt not in TENSORRT_MODES:
            raise MarsvisionError(
                f"--tensorrt {self.tensorrt!r}: choose one of " + ", ".join(TENSORRT_MODES)
            )
        if self.calib_images < 1:
            raise MarsvisionError(f"--calib-images {self.calib_images}: need at least 1 image")
        if self.max_batch < 1:
            raise MarsvisionError(f"--max-batch {self.max_batch}: need at least 1")
        if self.parity_images < 1:
            raise MarsvisionError("need at least 1 parity image")
