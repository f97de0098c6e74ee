"""The shipped model (models/resnet50-<task>.pt, or $MARS_MODELS): its files agree with their
sums and card, its INT8 export holds parity with PyTorch on the whole test split, and the
runtime's own output on the test images gives the card's test metrics.

Skipped, with the reason, while no model ships; these are the CI checks of a shipped model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from marsvision.export.cli import models_dir
from marsvision.train.checkpoint import load_checkpoint

MODELS = models_dir()
SHIPPED = sorted(MODELS.glob("resnet50-*.pt"))
INT8_POINTS = 0.5  # the bound: INT8 within 0.5 accuracy points

pytestmark = pytest.mark.skipif(not SHIPPED, reason=f"no model ships yet in {MODELS}")


@pytest.fixture(scope="module", params=SHIPPED, ids=lambda p: p.stem)
def shipped(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


@pytest.fixture(scope="module")
def exports(shipped: Path, msl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from marsvision.export.config import ExportConfig
    from marsvision.export.pipeline import export_all

    out = tmp_path_factory.mktemp("shipped-export")
    export_all(ExportConfig(checkpoint=shipped, out=out, int8=True, tensorrt="off",
                            data_dir=msl_dir))  # fmt: skip
    return out


def test_files_agree_with_sums_and_card(shipped: Path, msl_dir: Path) -> None:
    sha = hashlib.sha256(shipped.read_bytes()).hexdigest()
    lines = (MODELS / "SHA256SUMS").read_text().splitlines()
    sums = {name: digest for digest, name in (line.split("  ", 1) for line in lines)}
    assert sums[shipped.name] == sha
    card = shipped.with_suffix(".md").read_text()
    assert sha in card
    ckpt = load_checkpoint(shipped)
    assert ckpt["weights_dtype"] == "float16" and ckpt["shipped"]["command"] in card
    assert ckpt["shipped"]["scored_limit"] is None  # scored on the whole splits
    # the card is the card code's for this file: one written before a change to that code (the
    # binary card called the distilled weights the run's own, with the distilled file's sha256
    # as the run's) is written again (render_card, as make ship does)
    from marsvision.train.card import render_card

    assert card == render_card(ckpt, file_name=shipped.name, sha256=sha,
                               size_bytes=shipped.stat().st_size, data_dir=msl_dir)  # fmt: skip


def test_int8_parity_on_the_test_split(exports: Path, msl_dir: Path, tmp_path: Path) -> None:
    from marsvision.benchmarks.cli import main as bench

    args = ["parity", "--artifacts", str(exports), "--data", str(msl_dir), "--splits", "test",
            "--device", "cpu", "--int8-max-accuracy-change", str(INT8_POINTS),
            "--out", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output


def test_runtime_output_gives_the_cards_test_metrics(
    shipped: Path, exports: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """mars-infer (INT8) on every test image, scored by mars-bench score: within INT8_POINTS of
    the card's test accuracy (PyTorch on the shipped weights)."""
    from marsvision.benchmarks.cli import main as bench
    from marsvision.runtime.cli import main as infer
    from marsvision.runtime.models import artifact_name
    from marsvision.train.data import read_split

    ckpt = load_checkpoint(shipped)
    task = ckpt["task"]
    listing = tmp_path / "test.txt"
    listing.write_text("".join(f"{s.path}\n" for s in read_split(msl_dir, "test", task)))
    preds = tmp_path / "preds.csv"
    model = exports / artifact_name(task, "int8-cpu")
    result = CliRunner().invoke(infer, [f"@{listing}", "--engine", str(model), "--out", str(preds)])
    assert result.exit_code == 0, result.output
    args = ["score", str(preds), "--data", str(msl_dir), "--split", "test", "--out", str(tmp_path)]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    report = json.loads(next(tmp_path.glob("score-test-*.json")).read_text())
    got, card = report["metrics"]["accuracy"], ckpt["metrics"]["test"]["accuracy"]
    assert abs(got - card) * 100 <= INT8_POINTS, (got, card)
