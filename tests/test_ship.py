"""Shipping a run (train/ship.py): fp16 checkpoint, scores of the shipped weights, model card,
SHA256SUMS, the reproducing command; and mars-export's default to the shipped model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from marsvision.runtime.errors import MarsvisionError
from marsvision.train import data as msl
from marsvision.train.card import render_card
from marsvision.train.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    model_from_checkpoint,
    preprocess_from_checkpoint,
)
from marsvision.train.config import TrainConfig, command_line, config_from_flags
from marsvision.train.data import read_split, sol_key
from marsvision.train.metrics import bootstrap_cis, classification_metrics
from marsvision.train.ship import main as ship_main
from marsvision.train.ship import ship_run
from marsvision.train.transforms import eval_transform

SCORE_LIMIT = 24  # images per split the shipped weights are scored on
NOTES = ("Interim model: trained on the CPU at 64 px.", "Misses the 98% target.")


@pytest.fixture(scope="module")
def run(msl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished mars-train run: one epoch on a few images at 64 px."""
    from marsvision.train.cli import main as train_main

    out = tmp_path_factory.mktemp("shiprun") / "run"
    args = ["--data", str(msl_dir), "--epochs", "1", "--limit", "16", "--out", str(out),
            "--image-size", "64", "--device", "cpu", "--batch-size", "8", "--workers", "2",
            "--label-smoothing", "0.05"]  # fmt: skip
    result = CliRunner().invoke(train_main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def shipped(run: Path, msl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models folder the run was shipped into."""
    models = tmp_path_factory.mktemp("models")
    args = [str(run), "--models", str(models), "--data", str(msl_dir), "--device", "cpu",
            "--workers", "2", "--limit", str(SCORE_LIMIT), "--note", NOTES[0],
            "--note", NOTES[1], "--threshold-on-val"]  # fmt: skip
    result = CliRunner().invoke(ship_main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "test: accuracy" in result.output and "resnet50-binary.pt" in result.output
    return models


def test_shipped_checkpoint_is_fp16_and_loads(shipped: Path, run: Path) -> None:
    pt = shipped / "resnet50-binary.pt"
    ckpt = load_checkpoint(pt)
    state = ckpt["state_dict"]
    assert ckpt["weights_dtype"] == "float16"
    for key in ("conv1.weight", "fc.weight"):
        assert state[key].dtype == torch.float16, key
    for key in ("bn1.running_var", "bn1.weight", "fc.bias"):
        assert state[key].dtype == torch.float32, key
    assert pt.stat().st_size < 0.55 * (run / "checkpoint.pt").stat().st_size
    source = load_checkpoint(run / "checkpoint.pt")
    for key, value in source["state_dict"].items():  # the same weights, rounded to fp16
        assert torch.allclose(state[key].float(), value.float(), rtol=1e-3, atol=1e-4), key
    assert (
        ckpt["shipped"]["source_checkpoint_sha256"]
        == hashlib.sha256((run / "checkpoint.pt").read_bytes()).hexdigest()
    )


def test_scores_are_those_of_the_shipped_weights(shipped: Path, msl_dir: Path) -> None:
    """Recomputed here image by image with torchvision's transform, not the run's tensors."""
    ckpt = load_checkpoint(shipped / "resnet50-binary.pt")
    model = model_from_checkpoint(ckpt)
    tf = eval_transform(preprocess_from_checkpoint(ckpt))
    t = ckpt["decision_threshold"]
    assert t is not None and 0.0 < t < 1.0
    for split in ("val", "test"):
        samples = read_split(msl_dir, split, "binary", SCORE_LIMIT)
        x = torch.stack([tf(Image.open(s.path).convert("RGB")) for s in samples])
        with torch.no_grad():
            probs = model(x).softmax(1).numpy()
        pred = (probs[:, 1] >= t).astype(int)  # the label rule the card gives
        y = np.array([s.label for s in samples])
        want = classification_metrics(y, pred, 2, "binary")
        got = ckpt["metrics"][split]
        assert got["n"] == SCORE_LIMIT
        assert got["confusion_matrix"] == want["confusion_matrix"], split
        lo, hi = ckpt["metrics"]["ci95"][split]["accuracy"]
        assert lo <= got["accuracy"] <= hi
        sols = [sol_key(s.path) for s in samples]  # the same draws, whole sols resampled
        want_by_sol = bootstrap_cis(y, pred, 2, "binary", n_boot=1000, seed=0, groups=sols)
        assert ckpt["metrics"]["ci95_by_sol"][split] == want_by_sol
        if split != "val":
            continue
        # the threshold is (within the 0.5-point plateau) the best on val's balanced accuracy
        best = max(
            classification_metrics(y, (probs[:, 1] >= c).astype(int), 2, "binary")[
                "balanced_accuracy"
            ]
            for c in np.unique(probs[:, 1])
        )
        assert want["balanced_accuracy"] >= best - 0.005 - 1e-9
        argmax = classification_metrics(y, probs.argmax(1), 2, "binary")
        assert ckpt["metrics"]["val_argmax"]["confusion_matrix"] == argmax["confusion_matrix"]
        # and with --tta flip: the mean of the image's and its mirror's, the same rule
        with torch.no_grad():
            both = (probs + model(x.flip(-1)).softmax(1).numpy()) / 2
        flip = classification_metrics(y, (both[:, 1] >= t).astype(int), 2, "binary")
        assert ckpt["metrics"]["val_tta_flip"]["confusion_matrix"] == flip["confusion_matrix"]


def test_flip_tta_is_scored_on_the_mean_of_image_and_mirror(
    run: Path, msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mars-infer --tta flip`'s val score: the mean of the image's and its left-right mirror's
    probabilities, labelled by the threshold chosen on the image alone."""
    from marsvision.runtime.metadata import decide
    from marsvision.train import loop
    from marsvision.train.metrics import balanced_threshold
    from marsvision.train.ship import score_checkpoint

    rng = np.random.default_rng(0)
    calls = []

    def evaluate(_model: Any, *, inputs: Any, labels: Any, **_: Any) -> tuple[float, Any]:
        p = rng.uniform(size=len(labels))  # probabilities the labels depend on
        probs = np.stack([1 - p, p], 1)
        calls.append((inputs, labels.numpy(), probs))
        return 0.0, probs

    monkeypatch.setattr(loop, "evaluate", evaluate)
    scores = score_checkpoint(load_checkpoint(run / "checkpoint.pt"), data_dir=msl_dir,
                              device="cpu", workers=2, limit=SCORE_LIMIT,
                              threshold_on_val=True)  # fmt: skip
    (x, y, image), (x_mirror, _, mirror) = calls[:2]  # val, then its mirror
    assert torch.equal(x_mirror, x.flip(-1))
    t = balanced_threshold(y, image[:, 1])
    assert scores["decision_threshold"] == t
    want = classification_metrics(y, decide((image + mirror) / 2, t), 2, "binary")
    assert scores["val"]["tta_flip"] == want
    assert scores["val"]["metrics"] == classification_metrics(y, decide(image, t), 2, "binary")


def test_default_rule_is_argmax(run: Path, msl_dir: Path, tmp_path: Path) -> None:
    """Without --threshold-on-val the shipped model labels by the most probable class."""
    result = ship_run(run, models_dir=tmp_path, data_dir=msl_dir, device="cpu", workers=2,
                      limit=SCORE_LIMIT)  # fmt: skip
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["decision_threshold"] is None and result.scores["decision_threshold"] is None
    assert ckpt["metrics"]["val"] == ckpt["metrics"]["val_argmax"]
    assert "| label rule | the most probable class |" in result.card.read_text()


def test_a_shipped_model_shipped_again_keeps_its_source(
    shipped: Path, run: Path, msl_dir: Path, tmp_path: Path
) -> None:
    """Its card named the first ship's fp16 file as the run checkpoint, and that ship's fp16
    scores as the run's fp32 ones; it keeps the first ship's Notes unless --note replaces them."""
    result = ship_run(shipped / "resnet50-binary.pt", models_dir=tmp_path, data_dir=msl_dir,
                      device="cpu", workers=2, limit=16)  # fmt: skip
    again = load_checkpoint(result.checkpoint)
    assert again["shipped"]["notes"] == list(NOTES)
    assert f"## Notes\n\n- {NOTES[0]}\n- {NOTES[1]}\n" in result.card.read_text()
    # --note replaces them
    result = ship_run(shipped / "resnet50-binary.pt", models_dir=tmp_path / "b",
                      data_dir=msl_dir, device="cpu", workers=2, limit=16,
                      notes=("Shipped again.",))  # fmt: skip
    assert load_checkpoint(result.checkpoint)["shipped"]["notes"] == ["Shipped again."]
    source = load_checkpoint(run / "checkpoint.pt")
    sha = hashlib.sha256((run / "checkpoint.pt").read_bytes()).hexdigest()
    assert again["shipped"]["source_checkpoint_sha256"] == sha
    assert again["metrics"]["fp32_run"] == {s: source["metrics"][s] for s in ("val", "test")}
    card = result.card.read_text()
    assert f"| source run checkpoint | sha256 `{sha}` (fp32) |" in card
    fp32 = source["metrics"]["val"]["accuracy"]
    assert f"The run's own fp32 weights scored {100 * fp32:.2f} on val" in card


def test_card_and_sums(shipped: Path, msl_dir: Path) -> None:
    # the model, its card and the sums, nothing staged left beside them
    assert sorted(p.name for p in shipped.iterdir()) == [
        "SHA256SUMS", "resnet50-binary.md", "resnet50-binary.pt"]  # fmt: skip
    pt = shipped / "resnet50-binary.pt"
    sha = hashlib.sha256(pt.read_bytes()).hexdigest()
    assert (shipped / "SHA256SUMS").read_text() == f"{sha}  resnet50-binary.pt\n"
    card = (shipped / "resnet50-binary.md").read_text()
    ckpt = load_checkpoint(pt)
    assert sha in card and f"{pt.stat().st_size / 1e6:.1f} MB" in card
    assert ckpt["shipped"]["command"] in card and ckpt["data_fingerprint"] in card
    test = ckpt["metrics"]["test"]
    lo, hi = ckpt["metrics"]["ci95"]["test"]["accuracy"]
    assert f"{100 * test['accuracy']:.2f} ({100 * lo:.2f}-{100 * hi:.2f})" in card
    lo, hi = ckpt["metrics"]["ci95_by_sol"]["test"]["accuracy"]
    assert f"| test, by sol | | ({100 * lo:.2f}-{100 * hi:.2f}) |" in card
    assert "| test | 1,305 | 820 | 326 | 979 |" in card  # the split's real class counts
    assert "--val-half" not in card  # a train-only model's val is all of val
    assert f"at most {SCORE_LIMIT} images per split" in card  # a limited score says so
    # so does a limited run: it said "on the official MSL train split" of 16 images
    assert "trained and selected on at most the first 16 images of each split (`--limit 16`" in card
    assert f"## Notes\n\n- {NOTES[0]}\n- {NOTES[1]}\n" in card
    assert f"Rover when P(Rover) >= {float(ckpt['decision_threshold'])!r}" in card
    flip, val = ckpt["metrics"]["val_tta_flip"], ckpt["metrics"]["val"]
    assert f"val accuracy is {100 * flip['accuracy']:.2f}" in card
    helps = (flip["balanced_accuracy"], flip["accuracy"]) > (
        val["balanced_accuracy"], val["accuracy"])  # fmt: skip
    assert ("classify with `--tta flip`" in card) == helps
    assert ("leave it off" in card) == (not helps)
    assert ckpt["shipped"]["notes"] == list(NOTES)
    assert "trained from scratch (no ImageNet weights)" in card
    ckpt["config"]["init"] = "/weights/resnet50-11ad3fa6.pth"  # said from scratch before
    card = render_card(ckpt, file_name=pt.name, sha256=sha, size_bytes=pt.stat().st_size,
                       data_dir=msl_dir)  # fmt: skip
    assert "from scratch" not in card and "weights file `resnet50-11ad3fa6.pth` (`--init`)" in card
    assert "epoch 1 of 1 selected on val balanced accuracy |" in card
    # a time budget ended a 4-epoch run after epoch 1, before --select-from 0.5's epochs 2-4:
    # the last epoch run was kept, not selected on val (the card said selected)
    ckpt["config"].update(epochs=4, select_from=0.5)
    ckpt["metrics"].update(best_epoch=1, stopped_early_after_epoch=1)
    card = render_card(ckpt, file_name=pt.name, sha256=sha, size_bytes=pt.stat().st_size,
                       data_dir=msl_dir)  # fmt: skip
    assert ("epoch 1 of 4 kept as the last one run, before the epochs --select-from selects from "
            "(stopped after epoch 1: time budget) |") in card  # fmt: skip


def test_shipping_one_model_keeps_the_other_models_lines_of_the_sums(tmp_path: Path) -> None:
    """A ship rewrote SHA256SUMS from every *.pt's bytes as they were then: a checkpoint changed
    since it shipped (`sha256sum -c`: FAILED) was listed again with its new bytes and passed. Only
    the shipped file's line is new; a file never listed is not added, a file gone is dropped."""
    import subprocess

    from marsvision.train.ship import _write_sums

    for name in ("resnet50-binary.pt", "resnet50-msl25.pt", "copied-in.pt"):
        (tmp_path / name).write_bytes(name.encode())
    sums = tmp_path / "SHA256SUMS"
    names = ("resnet50-binary.pt", "resnet50-msl25.pt")
    digest = {n: hashlib.sha256(n.encode()).hexdigest() for n in names}
    sums.write_text(f"SHA256 (resnet50-msl25.pt) = {digest['resnet50-msl25.pt']}\n"
                    f"{digest['resnet50-binary.pt']} *./resnet50-binary.pt\n"
                    f"{'0' * 64}  removed.pt\n")  # fmt: skip
    (tmp_path / "resnet50-msl25.pt").write_bytes(b"changed since it shipped")
    (tmp_path / "resnet50-binary.pt").write_bytes(b"shipped now")
    new = hashlib.sha256(b"shipped now").hexdigest()
    _write_sums(tmp_path, "resnet50-binary.pt", new)
    assert sums.read_text() == (f"{new}  resnet50-binary.pt\n"
                                f"{digest['resnet50-msl25.pt']}  resnet50-msl25.pt\n")  # fmt: skip
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path,
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 1
    assert check.stdout.splitlines() == ["resnet50-binary.pt: OK", "resnet50-msl25.pt: FAILED"]


def test_card_counts_camera_frames_and_the_classes_splits_lack(msl_dir: Path) -> None:
    """The card's split table counts camera frames beside images (test's 1,305 images are 820
    frames), and its Limits say so; an msl25 card names the classes each split lacks (val lacks
    five, which selection on val cannot see) and the frames whose products disagree."""
    from marsvision.train.card import _data_limits, _split_counts, _splits

    names = msl.class_names("msl25", msl_dir)
    sets = _splits(msl_dir, "msl25", half=False)
    assert _split_counts(sets, "msl25", names)[2:] == [
        "| train | 3,746 | 2,389 | 24 of 25 |",
        "| val | 1,640 | 949 | 20 of 25 |",
        "| test | 1,305 | 820 | 22 of 25 |",
    ]
    frames, missing, noise = _data_limits(sets, "msl25", names)
    assert "test's 1,305 images are 820 frames" in frames
    assert "train 22; val 2, 11, 13, 20, 22; test 5, 22, 23 (selecting on val" in missing
    assert noise.startswith("- 14 frames have products labeled with different classes")
    binary = _splits(msl_dir, "binary", half=True)
    assert _data_limits(binary, "binary", names)[0] == frames  # and the cameras (test_card)
    assert _split_counts(binary, "binary", ["Surface", "Rover"])[2:] == [
        "| train | 3,746 | 2,389 | 2,603 | 1,143 |",
        "| val | 1,640 | 949 | 632 | 1,008 |",
        "| test | 1,305 | 820 | 326 | 979 |",
        "| val: first half by sol (trained on) | 804 | 461 | 276 | 528 |",
        "| val: second half (held out, selects) | 836 | 488 | 356 | 480 |",
    ]


def test_card_names_the_distillations_libraries_where_they_differ() -> None:
    from marsvision.train.card import _libraries

    trained = {"torch": "2.14.1", "torchvision": "0.29.1"}
    alone = "torch 2.14.1, torchvision 0.29.1"
    assert _libraries({"versions": trained}) == alone
    assert _libraries({"versions": trained, "distill": {"versions": dict(trained)}}) == alone
    gpu = {"torch": "2.11.0+cu130", "torchvision": "0.26.0"}
    assert _libraries({"versions": gpu, "distill": {"versions": trained}}) == (
        "training: torch 2.11.0+cu130, torchvision 0.26.0; distillation: " + alone
    )


def test_the_cards_command_reproduces_the_config(shipped: Path, run: Path) -> None:
    """Parse the card's command with mars-train's own flags: the same TrainConfig."""
    from marsvision.train.cli import main as train_main

    ckpt = load_checkpoint(shipped / "resnet50-binary.pt")
    argv = shlex.split(ckpt["shipped"]["command"])
    assert argv[0] == "mars-train"
    params = train_main.make_context("mars-train", argv[1:]).params
    drop = ("download", "resume", "workers", "data", "out")
    flags = {k: v for k, v in params.items() if k not in drop}
    cfg = config_from_flags(flags.pop("recipe"), data=Path("d"), out=Path("o"), **flags)
    want = json.loads((run / "config.json").read_text())
    got = json.loads(json.dumps(cfg.to_dict()))  # tuples as JSON lists, like config.json
    for key in ("data", "out", "workers", "resume"):
        got.pop(key), want.pop(key)
    assert got == want and want["label_smoothing"] == 0.05 and want["limit"] == 16


def test_the_cards_commands_name_their_data(
    shipped: Path, msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card's "Use and check it" commands parse with their CLIs' own flags, and those that
    read the MSL data name it: without $MARS_DATA, mars-export --int8 and mars-bench score and
    parity as the card wrote them stopped ("no MSL data given"). An msl25 card's export folder
    is its own: it sent the export into `exports`, the binary model's, which mars-export
    refuses for another model's artifacts."""
    from marsvision.benchmarks.cli import main as bench_main
    from marsvision.export.cli import main as export_main
    from marsvision.runtime.cli import main as infer_main

    monkeypatch.delenv("MARS_DATA", raising=False)
    ckpt = load_checkpoint(shipped / "resnet50-binary.pt")
    test = {**ckpt["metrics"]["test"], "per_class_recall": [None] * 25,
            "confusion_matrix": [[0] * 25] * 25}  # fmt: skip
    msl25 = {**ckpt, "task": "msl25", "class_names": [f"class{i}" for i in range(25)],
             "metrics": {**ckpt["metrics"], "test": test}}  # fmt: skip
    cards = {
        "exports": (shipped / "resnet50-binary.md").read_text(),
        "exports-msl25": render_card(
            msl25, file_name="resnet50-msl25.pt", sha256="0" * 64, size_bytes=1, data_dir=msl_dir
        ),  # fmt: skip
    }
    assert "or predicted by the model" in cards["exports-msl25"]  # macro: sklearn's labels
    for exports, card in cards.items():
        block = card.split("\n## Use and check it\n")[1].split("\n## ")[0]
        lines = [line for line in block.splitlines() if line.startswith("    mars-")]
        readers, folders = [], set()
        for line in lines:
            name, *args = shlex.split(line, comments=True)
            if name == "mars-bench":
                name, *args = args
            cmd = bench_main.commands.get(name) or {"mars-export": export_main,
                                                    "mars-infer": infer_main}[name]  # fmt: skip
            params = cmd.make_context(name, args).params
            if "data" in params:
                readers.append(name)
                assert str(params["data"]) == "../shared/msl", line
            folder = params.get("out") if name == "mars-export" else params.get("artifacts")
            if name == "mars-infer":
                folder = Path(params["engine"]).parent
            if folder is not None:
                folders.add(str(folder))
        assert readers == ["mars-export", "parity", "score"]  # parity before use
        assert folders == {exports}


def test_command_line_refuses_what_no_flag_sets() -> None:
    cfg = TrainConfig(data=Path("d"), out=Path("o"))
    command_line(cfg.to_dict())
    bent = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, rotate_deg=30.0))
    with pytest.raises(MarsvisionError, match="augment"):
        command_line(bent.to_dict())


def test_refuses_unfinished_runs_and_other_data(
    run: Path, tiny_checkpoint: Path, msl_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(MarsvisionError, match="unfinished run"):
        ship_run(tiny_checkpoint, models_dir=tmp_path / "m", data_dir=msl_dir)
    other = load_checkpoint(run / "checkpoint.pt")
    other["data_fingerprint"] = "0" * 64
    atomic_torch_save(other, tmp_path / "other.pt")
    with pytest.raises(MarsvisionError, match="not the data set"):
        ship_run(tmp_path / "other.pt", models_dir=tmp_path / "m", data_dir=msl_dir)
    # --threshold-on-val: binary models only (an msl25 model shipped with argmax, exit 0), and a
    # val of one class is refused in a line (balanced_threshold's ValueError, a traceback)
    msl25 = load_checkpoint(run / "checkpoint.pt")
    msl25["task"], msl25["class_names"] = "msl25", [f"class{i}" for i in range(25)]
    atomic_torch_save(msl25, tmp_path / "msl25.pt")
    with pytest.raises(MarsvisionError, match="--threshold-on-val: binary models only"):
        ship_run(tmp_path / "msl25.pt", models_dir=tmp_path / "m", data_dir=msl_dir,
                 threshold_on_val=True)  # fmt: skip
    assert len({s.label for s in read_split(msl_dir, "val", "binary", 2)}) == 1
    with pytest.raises(MarsvisionError, match="2 val images scored hold one class only"):
        ship_run(run, models_dir=tmp_path / "m", data_dir=msl_dir, device="cpu", workers=2,
                 limit=2, threshold_on_val=True)  # fmt: skip
    assert not (tmp_path / "m").exists()


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_refused_ship_leaves_the_models_folder_as_it_was(
    run: Path, shipped: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A train image missing from the data (only the card reads every image) is refused before
    the scoring; a failure after the scoring (here the card's) leaves the earlier model, card
    and SHA256SUMS together: the new checkpoint went in first, beside the old card and sums."""
    import shutil

    from marsvision.train import card, ship

    models = tmp_path / "models"
    shutil.copytree(shipped, models)
    before = _tree(models)
    data = tmp_path / "msl"
    (data / "calibrated").mkdir(parents=True)
    for f in msl_dir.iterdir():
        if f.is_file():
            (data / f.name).symlink_to(f)
    last = (data / msl.SPLIT_FILES["train"]).read_text().split()[-2]
    for f in (msl_dir / "calibrated").iterdir():
        if f.name != Path(last).name:
            (data / "calibrated" / f.name).symlink_to(f)

    def no_scoring(*args: Any, **kw: Any) -> Any:
        raise AssertionError("scored before the data was checked")

    with monkeypatch.context() as m:
        m.setattr(ship, "score_checkpoint", no_scoring)
        with pytest.raises(MarsvisionError, match=f"{Path(last).name} is missing"):
            ship_run(run, models_dir=models, data_dir=data, device="cpu", limit=SCORE_LIMIT)
    assert _tree(models) == before

    def broken_card(*args: Any, **kw: Any) -> str:
        raise MarsvisionError("the card could not be rendered")

    monkeypatch.setattr(card, "render_card", broken_card)
    with pytest.raises(MarsvisionError, match="the card could not be rendered"):
        ship_run(run, models_dir=models, data_dir=msl_dir, device="cpu", limit=SCORE_LIMIT,
                 threshold_on_val=False, notes=("another ship",))  # fmt: skip
    assert _tree(models) == before


def test_mars_export_defaults_to_the_shipped_model(
    shipped: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from marsvision.export.cli import main as export_main

    monkeypatch.setenv("MARS_MODELS", str(shipped))
    out = tmp_path / "exports"
    result = CliRunner().invoke(export_main, ["--out", str(out), "--data", str(msl_dir)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    sha = hashlib.sha256((shipped / "resnet50-binary.pt").read_bytes()).hexdigest()
    assert manifest["source_checkpoint_sha256"] == sha
    monkeypatch.setenv("MARS_MODELS", str(tmp_path / "none"))
    result = CliRunner().invoke(export_main, ["--out", str(out), "--data", str(msl_dir)])
    assert result.exit_code == 1 and "no shipped binary model" in result.output


def test_the_threshold_is_chosen_on_the_shipped_weights(
    shipped: Path, msl_dir: Path, run: Path
) -> None:
    """The decision threshold is the balanced one of the shipped (fp16) weights' val
    probabilities, as the card says ("exactly these weights"), not the fp32 source's: scoring the
    source passed the suite, the two giving the same decisions on the tiny model (a mutation
    audit; 0.77272624 against 0.77285349 there)."""
    from marsvision.train.metrics import balanced_threshold

    def val_threshold(ckpt: dict[str, Any]) -> float:
        model = model_from_checkpoint(ckpt)
        tf = eval_transform(preprocess_from_checkpoint(ckpt))
        samples = read_split(msl_dir, "val", "binary", SCORE_LIMIT)
        x = torch.stack([tf(Image.open(s.path).convert("RGB")) for s in samples])
        with torch.no_grad():
            probs = model(x).softmax(1).numpy()
        return float(balanced_threshold(np.array([s.label for s in samples]), probs[:, 1]))

    ckpt = load_checkpoint(shipped / "resnet50-binary.pt")
    fp16 = val_threshold(ckpt)
    assert fp16 != pytest.approx(val_threshold(load_checkpoint(run / "checkpoint.pt")), rel=1e-6)
    assert ckpt["decision_threshold"] == pytest.approx(fp16, rel=1e-6)


def test_a_shipped_model_is_replaced_only_by_one_as_good_on_the_same_val(
    shipped: Path, run: Path, msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make ship RUN=runs/smoke` (the README's 64-image run) replaced the production model, its
    card and SHA256SUMS without a word, and the SHA256SUMS check then passed the toy model. A
    model scored on other val images is refused before its scoring, one scored worse on the same
    images after it (the folder as it was both times), unless --replace."""
    import shutil

    from marsvision.train import ship

    models = tmp_path / "models"
    shutil.copytree(shipped, models)
    out = models / "resnet50-binary.pt"
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    old = load_checkpoint(out)
    val = old["metrics"]["val"]
    same = ship.val_images(old, scored_limit=SCORE_LIMIT, n=val["n"])
    assert ship.val_to_beat(out, same) == val["balanced_accuracy"]
    assert ship.val_to_beat(tmp_path / "none.pt", same) is None
    refit = {**old, "config": {**old["config"], "train_on": "train+val"}}
    for other in (ship.val_images(old, scored_limit=16, n=val["n"]),
                  ship.val_images(old, scored_limit=SCORE_LIMIT, n=8),
                  ship.val_images({**old, "config": {**old["config"], "limit": 64}},
                                  scored_limit=SCORE_LIMIT, n=val["n"]),
                  ship.val_images(refit, scored_limit=SCORE_LIMIT, n=val["n"])):  # fmt: skip
        with pytest.raises(MarsvisionError, match="is not replaced: their val figures are of "
                           "other images .*; pass --replace"):  # fmt: skip
            ship.val_to_beat(out, other)
    (tmp_path / "toy.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MarsvisionError, match="is no shipped checkpoint this can compare with"):
        ship.val_to_beat(tmp_path / "toy.pt", same)
    # the command: this run scored on other images than the shipped one: refused, not scored
    args = [str(run), "--models", str(models), "--data", str(msl_dir), "--device", "cpu",
            "--workers", "2", "--limit", "16"]  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(ship, "score_checkpoint", lambda *a, **k: pytest.fail("scored"))
        r = CliRunner().invoke(ship_main, args)
    assert r.exit_code == 1 and "is not replaced: their val figures are of other images" in (
        r.output
    )
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    # on the same images, scored worse (the shipped one's val made higher than it can be)
    monkeypatch.setattr(ship, "val_to_beat", lambda out, images: 1.01)
    r = CliRunner().invoke(ship_main, [*args[:-1], str(SCORE_LIMIT)])
    assert r.exit_code == 1 and "is not replaced: it scores val balanced accuracy 1.0100, " in (
        r.output
    )
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    r = CliRunner().invoke(ship_main, [*args, "--replace"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out)["shipped"]["scored_limit"] == 16
