"""Reading the real MSL splits, decoding images once, augmentation, and the download path."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see train/cli.py

import shutil
import socket
import stat
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.files import default_folder_mode
from marsvision.runtime.spec import PreprocessSpec
from marsvision.train import data as msl
from marsvision.train import download
from marsvision.train.augment import AugmentSpec, augment_batch
from marsvision.train.download import check_archive, download_msl, unpack_archive
from marsvision.train.images import decoded_once, eval_tensors, train_store
from marsvision.train.transforms import eval_transform

REPO = Path(__file__).resolve().parents[1]
MARS_TRAIN = [sys.executable, "-c", "from marsvision.train.cli import main; main()"]


def mini_data(src: Path, dest: Path, per_split: int = 4) -> Path:
    """A data folder in the upstream layout with the first few real images of each split."""
    (dest / "calibrated").mkdir(parents=True)
    shutil.copy(src / msl.SYNSET_FILE, dest / msl.SYNSET_FILE)
    for name in msl.SPLIT_FILES.values():
        lines = (src / name).read_text().splitlines()[:per_split]
        for line in lines:
            shutil.copy(src / line.split()[0], dest / line.split()[0])
        (dest / name).write_text("\n".join(lines) + "\n")
    return dest


def test_official_splits_as_published(msl_dir: Path) -> None:
    counts = {}
    for split in msl.SPLITS:
        samples = msl.read_split(msl_dir, split, "binary")
        counts[split] = (len(samples), sum(s.label == 0 for s in samples))
        assert all(s.label == (0 if s.msl_class in (5, 8, 9) else 1) for s in samples)
    assert counts == {"train": (3746, 2603), "val": (1640, 632), "test": (1305, 326)}
    first = (msl_dir / msl.SPLIT_FILES["train"]).read_text().split()[0]
    assert msl.read_split(msl_dir, "train", "msl25", limit=5)[0].path == msl_dir / first
    assert len(msl.read_split(msl_dir, "val", "msl25", limit=5)) == 5
    for limit in (0, -1):  # kept one image: `ship --limit 0` shipped a model scored on one
        with pytest.raises(MarsvisionError, match=f"--limit {limit}: need at least 1"):
            msl.read_split(msl_dir, "val", "msl25", limit=limit)
    assert len(msl.class_names("msl25", msl_dir)) == 25
    assert msl.class_names("binary", msl_dir) == ["Surface", "Rover"]


def test_val_halves_by_sol(msl_dir: Path) -> None:
    """`--train-on train+half-val`'s halves: every other sol of val, no sol in both, each half in
    file order, and both with MAHLI ground and drill holes (the close-ups train lacks)."""
    val = msl.read_split(msl_dir, "val", "binary")
    first, second = msl.halve_by_sol(val)
    assert (len(first), len(second)) == (804, 836)
    position = {s.path: i for i, s in enumerate(val)}
    assert sorted(position[s.path] for s in first + second) == list(range(len(val)))
    for half in first, second:  # file order kept
        assert [position[s.path] for s in half] == sorted(position[s.path] for s in half)
    sols = sorted({msl.sol_key(s.path) for s in val})
    assert {msl.sol_key(s.path) for s in first} == set(sols[::2])
    assert {msl.sol_key(s.path) for s in second} == set(sols[1::2])
    for half, ground, drill in ((first, 58, 182), (second, 29, 288)):
        mahli = Counter(s.msl_class for s in half if msl.camera(s.path) == "MH")
        assert (mahli[8], mahli[5]) == (ground, drill)
    with pytest.raises(MarsvisionError, match="all 2 images come from one sol"):
        msl.halve_by_sol([s for s in val if msl.sol_key(s.path) == "0270"][:2])


def test_frames_group_the_products_of_one_camera_frame(msl_dir: Path) -> None:
    """A frame's thumbnail (C00) and full image (I01) are one frame; other names their own."""
    train = {s.path.name: s for s in msl.read_split(msl_dir, "train", "msl25")}
    c00, i01 = (train[f"0019MR0000540060100176{p}_DRCL.JPG"] for p in ("C00", "I01"))
    assert msl.frame_key(c00.path) == msl.frame_key(i01.path) == "0019MR0000540060100176"
    assert (c00.msl_class, i01.msl_class) == (9, 8)  # horizon and ground: the labels differ
    for name in ("0019MR0000540060100177I01_DRCL.JPG", "rover.jpg", "0019MR00I01.JPG"):
        assert msl.frame_key(Path(name)) == (name if len(name) < 30 else name[:22])
    frames = {split: {msl.frame_key(s.path) for s in msl.read_split(msl_dir, split, "binary")}
              for split in msl.SPLITS}  # fmt: skip
    assert {k: len(v) for k, v in frames.items()} == {"train": 2389, "val": 949, "test": 820}
    # no frame in two splits (the note of 2026-12-06 says so of all three pairs)
    assert not (frames["train"] & frames["val"] or frames["val"] & frames["test"])
    assert not frames["train"] & frames["test"]


def test_missing_and_unreadable_images_are_errors_naming_the_file(
    msl_dir: Path, tmp_path: Path
) -> None:
    d = mini_data(msl_dir, tmp_path / "msl")
    samples = msl.read_split(d, "train", "binary")
    victim = samples[1].path
    victim.write_bytes(b"not a jpeg")
    spec = PreprocessSpec.for_input_size(64)
    with pytest.raises(MarsvisionError, match=victim.name):
        train_store(samples, store_size=73, interpolation="bilinear", workers=2)
    with pytest.raises(MarsvisionError, match=victim.name):
        eval_tensors(samples, spec=spec, workers=1)
    victim.unlink()
    with pytest.raises(MarsvisionError, match=f"{victim.name} is missing"):
        msl.read_split(d, "train", "binary")


def test_split_files_edited_by_hand(msl_dir: Path, tmp_path: Path) -> None:
    """A split file saved with a byte-order mark reads as without one; an image listed twice
    (it would count twice in the metrics), in two splits (a train image scored as test), or
    by an absolute path is refused naming the line; a zip file given as --data says so."""
    d = mini_data(msl_dir, tmp_path / "msl")
    train, test = d / msl.SPLIT_FILES["train"], d / msl.SPLIT_FILES["test"]
    plain = msl.read_split(d, "train", "binary")
    for name in (msl.SPLIT_FILES["train"], msl.SYNSET_FILE):
        (d / name).write_bytes(b"\xef\xbb\xbf" + (d / name).read_bytes())
    assert msl.read_split(d, "train", "binary") == plain
    assert msl.class_names("msl25", d) == msl.class_names("msl25", msl_dir)
    # Notepad's "Unicode" (UTF-16 with its mark) reads too; other bytes were a traceback
    readers: dict[str, Callable[[], object]] = {
        msl.SPLIT_FILES["train"]: lambda: msl.read_split(d, "train", "binary"),
        msl.SYNSET_FILE: lambda: msl.class_names("msl25", d),
    }
    for name, read in readers.items():
        want, text = read(), (d / name).read_text(encoding="utf-8-sig")
        (d / name).write_text(text, encoding="utf-16")
        assert read() == want
        (d / name).write_bytes(text.encode() + b"\xff\n")
        with pytest.raises(MarsvisionError, match=f"{name} is not UTF-8 text .*: save it as UTF-8"):
            read()
        (d / name).write_text(text)
    synset = (d / msl.SYNSET_FILE).read_text(encoding="utf-8-sig")
    (d / msl.SYNSET_FILE).write_text(synset.replace(" apxs\n", " =apxs\n", 1))
    with pytest.raises(MarsvisionError, match=r"synset.*: class name '=apxs' starts with '='"):
        msl.class_names("msl25", d)  # refused before training, as mars-infer refuses it
    (d / msl.SYNSET_FILE).write_text(synset)
    lines = train.read_text(encoding="utf-8-sig").splitlines()
    train.write_text("\n".join([*lines, lines[1]]) + "\n")
    listed = lines[1].split()[0]
    with pytest.raises(MarsvisionError, match=f":5: {listed} is listed again \\(line 2\\)$"):
        msl.read_split(d, "train", "binary")
    train.write_text("\n".join([*lines, f"./{lines[1]}"]) + "\n")  # another spelling of it
    with pytest.raises(MarsvisionError, match=f":5: ./{listed} is listed again \\(line 2\\)$"):
        msl.read_split(d, "train", "binary")
    again = f"calibrated/../{listed}"  # it passed as another image
    train.write_text("\n".join([*lines, f"{again} {lines[1].split()[1]}"]) + "\n")
    with pytest.raises(MarsvisionError, match=f":5: {again} is listed again \\(line 2\\)$"):
        msl.read_split(d, "train", "binary")
    train.write_text("\n".join([*lines, f"{d / listed} {lines[1].split()[1]}"]) + "\n")
    with pytest.raises(MarsvisionError, match=":5: .* is an absolute path; the split files"):
        msl.read_split(d, "train", "binary")
    train.write_text("\n".join(lines) + "\n")
    test.write_text(test.read_text() + f"calibrated/../{lines[0]}\n")  # in two splits
    splits = {s: msl.read_split(d, s, "binary") for s in msl.SPLITS}
    with pytest.raises(MarsvisionError, match="listed in both the train and the test split"):
        msl.check_disjoint(splits)
    archive = tmp_path / "msl-images.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(MarsvisionError, match="is a file; give the folder the data set is"):
        msl.resolve_data_dir(archive)


def test_a_data_folder_next_to_the_right_one_names_it(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images' folder (`calibrated`), or the folder an archive was unzipped into, was "not
    an MSL data directory" with no pointer to the one beside it; a wrong $MARS_DATA was said as
    a --data the user never typed."""
    images = msl_dir / "calibrated"
    with pytest.raises(MarsvisionError, match=rf"; the data set is in {msl_dir}: pass that$"):
        msl.resolve_data_dir(images)
    (tmp_path / "msl-images").symlink_to(msl_dir)  # as `unzip msl-images.zip -d tmp_path`
    with pytest.raises(MarsvisionError, match=rf"the data set is in {tmp_path / 'msl-images'}"):
        msl.resolve_data_dir(tmp_path)
    monkeypatch.setenv("MARS_DATA", str(tmp_path / "r1.csv"))
    (tmp_path / "r1.csv").write_text("x\n")
    with pytest.raises(MarsvisionError, match=rf"^MARS_DATA={tmp_path / 'r1.csv'} is a file"):
        msl.resolve_data_dir(None)
    # a relative path that is not there is said in full (`make demo MARS_DATA=shared/msl` reads
    # it from the repository, not from where the user stood)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MarsvisionError, match=rf"^--data shared/msl: MSL data directory "
                       rf"{tmp_path / 'shared/msl'} does not exist; run `mars-train --download "
                       rf"--data {tmp_path / 'shared/msl'}`$"):  # fmt: skip
        msl.resolve_data_dir("shared/msl")


def test_eval_tensors_are_exactly_the_eval_transform(msl_dir: Path) -> None:
    samples = msl.read_split(msl_dir, "test", "binary", limit=6)
    spec = PreprocessSpec.for_input_size(64)
    got = eval_tensors(samples, spec=spec, workers=3)
    tf = eval_transform(spec)
    want = torch.stack([tf(Image.open(s.path).convert("RGB")) for s in samples])
    assert got.dtype == torch.float32 and got.shape == (6, 3, 64, 64)
    assert torch.equal(got, want)


def normalize_uint8(batch: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 NCHW -> normalized float32, as step 4 of the spec (the reference for augment)."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0
    return (batch.float() - mean) / std


def test_train_store_and_augmentation(msl_dir: Path) -> None:
    samples = msl.read_split(msl_dir, "train", "binary", limit=8)
    spec = PreprocessSpec.for_input_size(64)
    store = train_store(samples, store_size=64, interpolation="bilinear", workers=2)
    assert store.dtype == torch.uint8 and store.shape == (8, 3, 64, 64)
    # no crop, rotation or jitter: every output is the image or its left-right mirror, never
    # upside down (the horizon has an orientation)
    flips_only = AugmentSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate_deg=0.0, jitter=0.0)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(store, out_size=64, spec=spec, aug=flips_only, generator=g)
    plain = normalize_uint8(store, spec)
    mirrored = 0
    for o, p in zip(out, plain, strict=True):
        same, mirror = (o - p).abs().max(), (o - p.flip(-1)).abs().max()
        assert min(same, mirror) < 1e-4
        assert (o - p.flip(-2)).abs().max() > 0.1
        mirrored += int(mirror < same)
    assert 0 < mirrored < 8
    # the full augmentation: right shape, normalized range, reproducible from the seed
    a = augment_batch(store, out_size=48, spec=spec, aug=AugmentSpec(),
                      generator=torch.Generator().manual_seed(3))  # fmt: skip
    b = augment_batch(store, out_size=48, spec=spec, aug=AugmentSpec(),
                      generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert a.shape == (8, 3, 48, 48) and torch.equal(a, b)
    assert -2.2 < a.min() and a.max() < 2.7
    assert not torch.allclose(a, torch.nn.functional.interpolate(plain, size=48))
    # --grayscale 1: every image grey (R = G = B before normalization), the geometry unchanged
    # (the grey draw comes after the affine ones); 0.5: some grey, some in colour
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    grey = augment_batch(store, out_size=64, spec=spec,
                         aug=dataclasses.replace(flips_only, grayscale=1.0),
                         generator=torch.Generator().manual_seed(0)) * std + mean  # fmt: skip
    assert (grey - grey[:, :1]).abs().max() < 1e-5
    colour = out * std + mean
    luma = 0.299 * colour[:, 0:1] + 0.587 * colour[:, 1:2] + 0.114 * colour[:, 2:3]
    assert (grey - luma).abs().max() < 1e-5
    half = augment_batch(store, out_size=64, spec=spec,
                         aug=dataclasses.replace(flips_only, grayscale=0.5),
                         generator=torch.Generator().manual_seed(0)) * std + mean  # fmt: skip
    is_grey = [bool((h - h[:1]).abs().max() < 1e-5) for h in half]
    assert 0 < sum(is_grey) < 8
    for h, c, g_ in zip(half, colour, grey, strict=True):
        assert min((h - c).abs().max(), (h - g_).abs().max()) < 1e-5


def _zip_dataset(src: Path, path: Path, root: str = "msl-images/") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, root + f.relative_to(src).as_posix())
    return path


def test_check_and_unpack_archive(msl_dir: Path, tmp_path: Path) -> None:
    src = mini_data(msl_dir, tmp_path / "src", per_split=3)
    archive = _zip_dataset(src, tmp_path / "msl-images.zip")
    with pytest.raises(MarsvisionError, match="expected about 60.6 MB"):
        check_archive(archive)  # the real size check
    root = check_archive(archive, expected_bytes=None)
    assert root == "msl-images/"
    dest = unpack_archive(archive, tmp_path / "data", root)
    assert msl.resolve_data_dir(dest) == dest
    assert stat.S_IMODE(dest.stat().st_mode) == default_folder_mode()  # was mkdtemp's 0o700
    assert len(msl.read_split(dest, "test", "msl25")) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(MarsvisionError, match="not empty"):
        unpack_archive(archive, dest, root)


def test_a_damaged_image_member_is_a_one_line_error(msl_dir: Path, tmp_path: Path) -> None:
    """check_archive reads the split files only: an image member with a bad CRC passed it and
    then ended the unpacking in a zipfile.BadZipFile traceback."""
    src = mini_data(msl_dir, tmp_path / "src", per_split=3)
    archive = _zip_dataset(src, tmp_path / "msl-images.zip")
    with zipfile.ZipFile(archive) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".JPG"))
    data = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF  # one byte inside the member's data
    archive.write_bytes(bytes(data))
    root = check_archive(archive, expected_bytes=None)
    with pytest.raises(MarsvisionError, match="is damaged .*download it again"):
        unpack_archive(archive, tmp_path / "data", root)
    assert not (tmp_path / "data").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_archive_member_under_the_root_that_is_absolute_is_refused(
    msl_dir: Path, tmp_path: Path
) -> None:
    """A doubled slash after the root ("msl-images//tmp/x") passed the check, and the unpacking,
    which joins what follows the root, wrote the file to /tmp/x."""
    src = mini_data(msl_dir, tmp_path / "src", per_split=3)
    archive = _zip_dataset(src, tmp_path / "msl-images.zip")
    outside = tmp_path / "outside.txt"
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("msl-images/" + outside.as_posix(), "escaped")
    with pytest.raises(MarsvisionError, match="points outside the archive"):
        check_archive(archive, expected_bytes=None)
    with pytest.raises(MarsvisionError, match="points outside"):
        unpack_archive(archive, tmp_path / "data", "msl-images/")  # unchecked: refused there too
    assert not outside.exists()


def test_an_archive_that_would_unpack_to_too_much_is_refused(
    msl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the zip's own size was checked: a mirror's zip of the right size (`MARS_MSL_URL`)
    with a member of zeros unpacked 1 GB per MB, until the disk was full."""
    from marsvision.train import download

    src = mini_data(msl_dir, tmp_path / "src", per_split=3)
    archive = _zip_dataset(src, tmp_path / "msl-images.zip")
    assert check_archive(archive, expected_bytes=None) == "msl-images/"
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("msl-images/calibrated/pad.JPG", bytes(2_000_000))
    assert archive.stat().st_size < 2_000_000
    monkeypatch.setattr(download, "UNPACKED_LIMIT", 2_000_000)  # the real one is 243 MB
    with pytest.raises(MarsvisionError, match=r"would unpack to \d+ MB, more than 2 MB"):
        check_archive(archive, expected_bytes=None)


def test_a_damaged_split_file_member_is_a_one_line_error(tmp_path: Path) -> None:
    """check_archive reads the split files: damaged compressed bytes raised zlib.error (a
    traceback), and a bad CRC was called "not a zip archive"."""
    text = "".join(f"calibrated/{i:04d}ML{i:08d}.JPG {i % 25}\n" for i in range(500))
    archive = tmp_path / "msl-images.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in (*msl.SPLIT_FILES.values(), msl.SYNSET_FILE):
            zf.writestr("msl-images/" + name, text)
        info = zf.getinfo("msl-images/" + msl.SPLIT_FILES["train"])
    raw = archive.read_bytes()
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    reasons = set()
    for k in range(0, info.compress_size, info.compress_size // 20):
        damaged = bytearray(raw)
        damaged[start + k] ^= 0xFF
        archive.write_bytes(bytes(damaged))
        with pytest.raises(MarsvisionError, match=r"is damaged \((.*)\); download it again") as e:
            check_archive(archive, expected_bytes=None)
        reasons.add(e.value.message.split("(")[1][:9])
    assert reasons == {"Bad CRC-3", "Error -3 "}  # both ways of damage were met


def test_archive_whose_splits_do_not_resolve(msl_dir: Path, tmp_path: Path) -> None:
    src = mini_data(msl_dir, tmp_path / "src", per_split=3)
    missing = (src / msl.SPLIT_FILES["val"]).read_text().split()[0]
    (src / missing).unlink()
    archive = _zip_dataset(src, tmp_path / "bad.zip", root="")
    with pytest.raises(MarsvisionError, match=Path(missing).name):
        check_archive(archive, expected_bytes=None)
    (tmp_path / "junk.zip").write_bytes(b"PK not really")
    with pytest.raises(MarsvisionError, match="not a zip"):
        check_archive(tmp_path / "junk.zip", expected_bytes=None)


def _run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        MARS_TRAIN + args, check=False, capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, **env},
    )  # fmt: skip


def test_download_offline_is_one_line(tmp_path: Path) -> None:
    dest = tmp_path / "msl"
    # nothing listens on port 9 (discard): the same failure as having no internet
    r = _run_cli(["--download", "--data", str(dest)], MARS_MSL_URL="http://127.0.0.1:9/x.zip")
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("Error: cannot download") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_download_stopped_by_a_signal_leaves_nothing(tmp_path: Path) -> None:
    """--download ran outside `interruptible`: SIGTERM left the partial zip (up to 60 MB) beside
    --data, Ctrl-C said "Aborted!" and exit 1, and a log of the progress got a carriage return
    a megabyte. The source here is a FIFO whose writer stalls after 2 MB."""
    import signal
    import threading
    import time

    fifo = tmp_path / "msl-images.zip"
    os.mkfifo(fifo)
    stall = threading.Event()

    def write() -> None:
        try:
            with open(fifo, "wb") as f:
                f.write(bytes(2 << 20))
                f.flush()
                stall.wait(120)
        except BrokenPipeError:
            pass

    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        out = tmp_path / f"out{code}"
        out.mkdir()
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        proc = subprocess.Popen(
            [*MARS_TRAIN, "--download", "--data", str(out / "msl")], cwd=REPO,
            env={**os.environ, "MARS_MSL_URL": fifo.as_uri()},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # bytes: text mode reads \r as \n
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not any(p.stat().st_size >= 2 << 20 for p in out.iterdir()):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(sig)
            err = proc.communicate(timeout=60)[1].decode()
        finally:
            proc.kill()
            stall.set()
            writer.join(10)
            stall.clear()
        assert proc.returncode == code, err
        assert "Traceback" not in err and "\r" not in err and "Aborted" not in err, err
        assert list(out.iterdir()) == []


def test_download_into_a_file_is_refused_before_fetching(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    # the URL would fail too: the folder check must come first, and name --data
    with pytest.raises(MarsvisionError, match=r"--data .*a-file is not a folder"):
        download_msl(tmp_path / "a-file" / "msl", url="http://127.0.0.1:9/x.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_download_into_a_folder_that_holds_the_data_set_checks_it(
    msl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing image's error says to re-download the data set; --download into that folder
    printed the folder and exited 0, the image still missing. It checks every listed image and
    says that nothing was downloaded."""
    data = mini_data(msl_dir, tmp_path / "msl")
    url = "http://127.0.0.1:9/x.zip"  # never fetched
    assert download_msl(data, url=url) == data
    assert capsys.readouterr().err == f"{data} holds the MSL data set already: nothing downloaded\n"
    first = (data / msl.SPLIT_FILES["val"]).read_text().split()[0]
    (data / first).unlink()
    said = (
        r"\(re-download the data set into an empty folder: mars-train --download --data NEW_DIR\)$"
    )
    with pytest.raises(MarsvisionError, match=rf"{first} is missing; .*{said}"):
        download_msl(data, url=url)
    (data / msl.SPLIT_FILES["val"]).unlink()  # the train list alone: a FileNotFoundError traceback
    with pytest.raises(MarsvisionError, match=r"is not an MSL data directory: missing val-"):
        download_msl(data, url=url)


def test_download_of_a_wrong_archive_leaves_nothing(msl_dir: Path, tmp_path: Path) -> None:
    src = mini_data(msl_dir, tmp_path / "src", per_split=2)
    archive = _zip_dataset(src, tmp_path / "small.zip")
    dest = tmp_path / "out" / "msl"
    (tmp_path / "out").mkdir()
    with pytest.raises(MarsvisionError, match="expected about 60.6 MB"):
        download_msl(dest, url=archive.as_uri())
    assert list((tmp_path / "out").iterdir()) == []


def test_a_download_in_a_log_says_what_it_fetches_as_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """stderr not a terminal: the URL first, then a line every LOG_EVERY bytes (it said nothing
    until the end: minutes of silence on a slow link)."""
    from marsvision.train import download

    src = tmp_path / "big.zip"
    src.write_bytes(bytes(5_000_000))
    monkeypatch.setattr(download, "LOG_EVERY", 2_000_000)
    download._fetch(src.as_uri(), tmp_path / "got", timeout=5)
    assert (tmp_path / "got").read_bytes() == src.read_bytes()
    assert capsys.readouterr().err.splitlines() == [
        f"downloading {src.as_uri()} (5.0 MB)",
        "downloaded 2.1 of 5.0 MB",
        "downloaded 4.2 of 5.0 MB",
        "downloaded 5.0 MB",
    ]
    src.write_bytes(bytes(4 << 20))  # its last chunk crosses a line's mark: that line ends it
    download._fetch(src.as_uri(), tmp_path / "got", timeout=5)
    assert capsys.readouterr().err.splitlines()[1:] == [
        "downloaded 2.1 of 4.2 MB",
        "downloaded 4.2 of 4.2 MB",
    ]


def test_the_data_fingerprint_covers_the_class_names(msl_dir: Path, tmp_path: Path) -> None:
    """A data folder whose class names differ (a class renamed) is other data: its fingerprint
    differs, so mars-export and mars-bench refuse it for a checkpoint trained on the MSL names
    (without the names file in the fingerprint the suite passed)."""
    for name in (*msl.SPLIT_FILES.values(), msl.SYNSET_FILE):
        shutil.copy(msl_dir / name, tmp_path / name)
    assert msl.data_fingerprint(tmp_path) == msl.data_fingerprint(msl_dir)
    text = (tmp_path / msl.SYNSET_FILE).read_text(encoding="utf-8-sig")
    assert " apxs\n" in text
    (tmp_path / msl.SYNSET_FILE).write_text(text.replace(" apxs\n", " apxs2\n", 1))
    assert msl.data_fingerprint(tmp_path) != msl.data_fingerprint(msl_dir)


@pytest.fixture
def archive(msl_dir: Path, tmp_path: Path) -> Path:
    """A small msl-images.zip of real images, its data set under `msl-images/`."""
    return _zip_dataset(
        mini_data(msl_dir, tmp_path / "src", per_split=3), tmp_path / "msl-images.zip"
    )


def test_the_size_check_allows_two_percent_either_way(archive: Path) -> None:
    """A download 3% short (cut off) or 3% long (another file) is refused; within 2% of the
    expected size either way it is taken."""
    size = archive.stat().st_size
    for expected in (size / 0.97, size / 1.03):
        with pytest.raises(MarsvisionError, match="incomplete or not msl-images.zip"):
            check_archive(archive, expected_bytes=round(expected))
    for expected in (size / 0.99, size / 1.01):
        assert check_archive(archive, expected_bytes=round(expected)) == "msl-images/"


def test_an_archive_member_that_climbs_out_of_the_folder_is_refused(
    archive: Path, tmp_path: Path
) -> None:
    """A member named "msl-images/../x" would unpack beside the data folder, not in it: the
    check refuses it, and so does the unpacking of an unchecked archive; nothing is written."""
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("msl-images/../escaped.txt", "escaped")
    with pytest.raises(MarsvisionError, match="points outside the archive"):
        check_archive(archive, expected_bytes=None)
    with pytest.raises(MarsvisionError, match="points outside"):
        unpack_archive(archive, tmp_path / "out" / "data", "msl-images/")
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "out" / "data").exists()


@pytest.mark.parametrize("lacking", [msl.SYNSET_FILE, msl.SPLIT_FILES["test"]])
def test_an_archive_without_a_list_file_is_refused(
    lacking: str, msl_dir: Path, tmp_path: Path
) -> None:
    """The class names and every split file must be in the archive: one missing is named
    before anything is unpacked."""
    src = mini_data(msl_dir, tmp_path / "src", per_split=3)
    (src / lacking).unlink()
    path = _zip_dataset(src, tmp_path / "msl-images.zip")
    with pytest.raises(MarsvisionError, match=f"the archive lacks msl-images/{lacking}$"):
        check_archive(path, expected_bytes=None)


def test_only_the_data_set_folder_is_unpacked(archive: Path, tmp_path: Path) -> None:
    """Members beside the data set's folder in the zip (macOS's __MACOSX copies, a readme) are
    not unpacked into --data."""
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("__MACOSX/msl-images/._x.JPG", "resource fork")
        zf.writestr("README.txt", "about")
    root = check_archive(archive, expected_bytes=None)
    dest = unpack_archive(archive, tmp_path / "data", root)
    src = tmp_path / "src"  # what the archive fixture zipped under msl-images/
    assert {p.relative_to(dest) for p in dest.rglob("*") if p.is_file()} == {
        p.relative_to(src) for p in src.rglob("*") if p.is_file()
    }


def test_an_unpacked_data_set_that_does_not_read_is_refused(msl_dir: Path, tmp_path: Path) -> None:
    """Every listed image is in the zip, but a split file's label is not a class: the unpacked
    folder is checked as the trainer reads it, and refused, leaving nothing behind."""
    src = mini_data(msl_dir, tmp_path / "src", per_split=3)
    test_list = src / msl.SPLIT_FILES["test"]
    first = test_list.read_text().splitlines()[0].split()[0]
    test_list.write_text(f"{first} 99\n")
    path = _zip_dataset(src, tmp_path / "msl-images.zip")
    root = check_archive(path, expected_bytes=None)
    (tmp_path / "out").mkdir()
    with pytest.raises(MarsvisionError, match="class id 99 is outside 0-24"):
        unpack_archive(path, tmp_path / "out" / "data", root)
    assert list((tmp_path / "out").iterdir()) == []


def test_download_into_a_folder_with_other_files_is_refused_before_fetching(
    tmp_path: Path,
) -> None:
    """A --data folder holding other files is refused before the 60 MB are fetched (the URL
    here would fail: the folder's error comes first), and its files are left as they were."""
    dest = tmp_path / "msl"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(MarsvisionError, match="exists and is not empty"):
        download_msl(dest, url="http://127.0.0.1:9/x.zip")
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]


def test_a_download_that_stalls_midway_is_a_one_line_error(tmp_path: Path) -> None:
    """A server that sends part of the file and then nothing (a stalled mirror) ends the
    download at the timeout as a user error naming the URL, not a TimeoutError traceback."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n" + bytes(1000))
        done.wait(10)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/msl-images.zip"
    try:
        with pytest.raises(MarsvisionError, match=f"cannot download {url} "):
            download._fetch(url, tmp_path / "got.zip", timeout=0.5)
    finally:
        done.set()
        thread.join(10)
        server.close()


def test_decoded_once_keeps_one_tensor_per_file_list_and_preprocessing(msl_dir: Path) -> None:
    """Inside decoded_once a second call with the same files and preprocessing gets the same
    tensor, and another store size, interpolation or eval spec gets its own, never one decoded
    for other settings (a sweep's runs at 64 px and 96 px would train on one size)."""
    samples = msl.read_split(msl_dir, "val", "binary", limit=2)
    other = msl.read_split(msl_dir, "test", "binary", limit=2)
    small, large = PreprocessSpec.for_input_size(64), PreprocessSpec.for_input_size(96)

    def store(
        size: int, interpolation: str = "bilinear", s: list[msl.Sample] = samples
    ) -> torch.Tensor:
        return train_store(s, store_size=size, interpolation=interpolation, workers=1)

    with decoded_once():
        a = store(40)
        assert store(40) is a and a.shape == (2, 3, 40, 40)
        assert store(48).shape == (2, 3, 48, 48)
        bicubic = store(40, "bicubic")
        assert bicubic is not a and torch.equal(
            bicubic, train_store(samples, store_size=40, interpolation="bicubic", workers=2)
        )
        assert not torch.equal(store(40, s=other), a)
        e = eval_tensors(samples, spec=small, workers=1)
        assert eval_tensors(samples, spec=small, workers=1) is e
        assert eval_tensors(samples, spec=large, workers=1).shape == (2, 3, 96, 96)


def test_decoded_once_blocks_nest_and_free_at_the_outermost_end(msl_dir: Path) -> None:
    """A nested block shares its outer block's tensors and leaves them there when it ends;
    outside every block nothing is kept (each call decodes anew)."""
    samples = msl.read_split(msl_dir, "val", "binary", limit=2)

    def store() -> torch.Tensor:
        return train_store(samples, store_size=40, interpolation="bilinear", workers=1)

    assert store() is not store()
    with decoded_once():
        outer = store()
        with decoded_once():
            assert store() is outer
        assert store() is outer
    assert store() is not outer
