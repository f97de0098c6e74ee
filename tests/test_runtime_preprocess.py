"""Runtime preprocessing (Pillow + numpy) against the torchvision reference, on MSL images."""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.preprocess import ImageError, decode_image, load_image, resized_size
from marsvision.runtime.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec


def _msl_images(msl_dir: Path, n: int) -> list[Path]:
    from marsvision.train.data import read_split

    return [s.path for s in read_split(msl_dir, "val", "binary", limit=n)]


@pytest.mark.parametrize("size,interp", [(64, "bilinear"), (96, "bicubic"), (224, "bilinear")])
def test_matches_eval_transform(msl_dir: Path, size: int, interp: str) -> None:
    from marsvision.train.transforms import eval_transform

    spec = PreprocessSpec(input_size=size, resize_size=round(size / 0.875), interpolation=interp)
    ref = eval_transform(spec)
    for path in _msl_images(msl_dir, 12):
        got = load_image(path, spec)
        want = ref(Image.open(path).convert("RGB")).numpy()
        assert got.shape == want.shape == (3, size, size) and got.dtype == np.float32
        assert float(np.abs(got - want).max()) < 1e-5, path


def test_same_top1_as_torch_on_tiny_model(msl_dir: Path, tiny_checkpoint: Path) -> None:
    import torch

    from marsvision.train.checkpoint import (
        load_checkpoint,
        model_from_checkpoint,
        preprocess_from_checkpoint,
    )
    from marsvision.train.transforms import eval_transform

    ckpt = load_checkpoint(tiny_checkpoint)
    spec = preprocess_from_checkpoint(ckpt)
    model = model_from_checkpoint(ckpt)
    paths = _msl_images(msl_dir, 16)
    ours = torch.from_numpy(np.stack([load_image(p, spec) for p in paths]))
    ref = torch.stack([eval_transform(spec)(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        a, b = model(ours), model(ref)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert float((a - b).abs().max()) < 1e-4


def test_resized_size_rounds_like_torchvision() -> None:
    assert resized_size(256, 192, 73) == (97, 73)
    assert resized_size(192, 256, 73) == (73, 97)
    assert resized_size(100, 100, 73) == (73, 73)
    # 146.67 and 147.33: torchvision truncates, on the long side of both orientations
    assert resized_size(192, 256, 110) == (110, 146)
    assert resized_size(256, 192, 110) == (146, 110)


def test_resized_size_is_torchvision_resize() -> None:
    """The size torchvision's Resize gives, for landscape, portrait and square images."""
    from torchvision.transforms import functional as F

    for w, h in [(192, 256), (256, 192), (1344, 1200), (1200, 1344), (77, 300), (300, 77)]:
        for s in (73, 110, 146, 256):
            assert F.resize(Image.new("L", (w, h)), [s]).size == resized_size(w, h, s), (w, h, s)


def _save(tmp_path: Path, name: str, img: Image.Image, **kw: Any) -> Path:
    p = tmp_path / name
    img.save(p, **kw)
    return p


def test_image_modes_become_rgb(tmp_path: Path, msl_dir: Path) -> None:
    spec = PreprocessSpec.for_input_size(64)
    src = Image.open(_msl_images(msl_dir, 1)[0]).convert("RGB")
    gray = src.convert("L")
    files = {
        "gray.png": gray,
        "rgba.png": src.convert("RGBA"),
        "palette.png": src.convert("P"),
        "cmyk.jpg": src.convert("CMYK"),
        "bilevel.png": src.convert("1"),
    }
    for name, img in files.items():
        x = load_image(_save(tmp_path, name, img), spec)
        assert x.shape == (3, 64, 64) and np.isfinite(x).all(), name
    # 16-bit grayscale is scaled to 8 bits, not clipped to white
    g16 = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)
    x16 = load_image(_save(tmp_path, "gray16.png", g16), spec)
    x8 = load_image(_save(tmp_path, "gray8.png", gray), spec)
    assert float(np.abs(x16 - x8).max()) < 1e-5
    # 12-bit data in a 16-bit file (camera products): scaled by 12 bits, not 16 (nearly black,
    # and labelled as a black image); training and the PyTorch reference decode it alike
    from marsvision.train.images import open_rgb
    from marsvision.train.transforms import eval_transform

    g12 = Image.fromarray(
        np.rint(np.asarray(gray, dtype=np.float64) * 4095 / 255).astype(np.uint16)
    )
    for name, img in (("gray12.png", g12), ("gray12.tif", g12.convert("I"))):
        x12 = load_image(_save(tmp_path, name, img), spec)
        assert float(np.abs(x12 - x8).max()) < 1e-5, name
        torch_x = eval_transform(spec)(open_rgb(tmp_path / name)).numpy()
        assert float(np.abs(torch_x - x12).max()) < 1e-5, name
    # grayscale: the three channels hold the same pixel values
    d = decode_image(tmp_path / "gray.png", spec)
    assert (d[..., 0] == d[..., 1]).all() and (d[..., 1] == d[..., 2]).all()


def test_eps_is_not_read_and_mpo_decodes_fast(
    tmp_path: Path, msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EPS file named like an image made Pillow run Ghostscript on it; --fast-decode skipped
    MPO files (many cameras' JPEGs), decoding them at full size."""
    from PIL import JpegImagePlugin

    spec = PreprocessSpec.for_input_size(64)
    gs = tmp_path / "bin" / "gs"  # a Ghostscript that says when it runs
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\ntouch {tmp_path / 'gs-ran'}\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}:{os.environ['PATH']}")
    eps = tmp_path / "photo.jpg"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    with pytest.raises(ImageError, match="not an image Pillow can read"):
        decode_image(eps, spec)
    from marsvision.runtime.errors import MarsvisionError
    from marsvision.train.images import open_rgb

    with pytest.raises(MarsvisionError, match="cannot be read"):  # training's decoder too
        open_rgb(eps)
    assert not (tmp_path / "gs-ran").exists()
    src = Image.open(_msl_images(msl_dir, 1)[0]).convert("RGB").resize((1024, 768))
    mpo = _save(tmp_path, "camera.jpg", src, format="MPO", save_all=True,
                append_images=[src])  # fmt: skip
    assert Image.open(mpo).format == "MPO"
    drafts: list[object] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def counted_draft(self: Any, *a: Any) -> Any:
        drafts.append(a)
        return draft(self, *a)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", counted_draft)
    decode_image(mpo, spec, fast_decode=True)
    assert drafts


def test_bad_files_raise_image_error(tmp_path: Path, msl_dir: Path) -> None:
    spec = PreprocessSpec.for_input_size(64)
    good = _msl_images(msl_dir, 1)[0].read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "text.jpg").write_text("not an image\n")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "dir.jpg").mkdir()
    for name in ("empty.jpg", "truncated.jpg", "text.jpg", "broken.jpg", "dir.jpg", "nope.jpg"):
        with pytest.raises(ImageError):
            decode_image(tmp_path / name, spec)


def test_a_jpeg_cut_short_with_its_end_marker_is_refused(tmp_path: Path, msl_dir: Path) -> None:
    """A JPEG whose data stops part-way but still ends in an end marker (a downlink's lost
    packets, a file cut and mended) decoded `ok`, its missing rows mid-grey: classified with
    confidence. It is refused as a truncated file is; the whole image still decodes."""
    import io

    from PIL import Image

    spec = PreprocessSpec.for_input_size(64)
    src = Image.open(_msl_images(msl_dir, 1)[0]).convert("RGB").resize((256, 256))
    for mode in ("RGB", "L"):
        buf = io.BytesIO()
        src.convert(mode).save(buf, "JPEG", quality=90)
        whole = buf.getvalue()
        (tmp_path / "whole.jpg").write_bytes(whole)
        decode_image(tmp_path / "whole.jpg", spec)
        start = whole.index(b"\xff\xda")  # the scan's data follows its header
        cut = whole[: start + (len(whole) - start) // 2] + b"\xff\xd9"
        (tmp_path / "cut.jpg").write_bytes(cut)
        with pytest.raises(ImageError, match=r"data ends early, its last \d+ of 256 rows"):
            decode_image(tmp_path / "cut.jpg", spec)
        with pytest.raises(ImageError, match="data ends early"):  # a draft decode too
            decode_image(tmp_path / "cut.jpg", spec, fast_decode=True)
    for name in ("flat.png", "flat.jpg"):  # a PNG's grey, or a JPEG's grey all over, is its own
        Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / name)
        assert (decode_image(tmp_path / name, spec) == 128).all()


def test_an_os_without_nonblocking_opens_reads_images(
    msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows has no os.O_NONBLOCK (and no set_blocking for files): every image was an error
    row there ("module 'os' has no attribute 'O_NONBLOCK'")."""
    spec = PreprocessSpec.for_input_size(64)
    path = _msl_images(msl_dir, 1)[0]
    want = decode_image(path, spec)
    monkeypatch.delattr(os, "O_NONBLOCK")
    monkeypatch.delattr(os, "set_blocking")
    assert (decode_image(path, spec) == want).all()


def _decoding(path: Path, spec: PreprocessSpec) -> tuple[threading.Thread, list[BaseException]]:
    """A thread (not started) that decodes `path`, and the list where what it raises lands."""
    got: list[BaseException] = []

    def decode() -> None:
        try:
            decode_image(path, spec)
        except BaseException as e:  # noqa: BLE001
            got.append(e)

    return threading.Thread(target=decode, daemon=True), got


def test_files_that_are_not_images_on_disk(tmp_path: Path, msl_dir: Path) -> None:
    """A FIFO named like an image without a writer is an error at once (opening it waited for a
    writer forever, and Ctrl-C could not stop the run), a pipe with a writer is read
    (`mars-infer <(cat image.jpg)`), a device is refused (/dev/zero would be read forever), and
    a file-system error (a symlink loop, a path through a file) is reported as one, not as a
    corrupt image."""

    spec = PreprocessSpec.for_input_size(64)
    good = tmp_path / "good.jpg"
    good.write_bytes(_msl_images(msl_dir, 1)[0].read_bytes())
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    t, got = _decoding(fifo, spec)
    t.start()
    t.join(10)
    if t.is_alive():  # blocked in open: a writer's open and close release it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail("decoding a FIFO waited for a writer")
    assert len(got) == 1 and isinstance(got[0], ImageError)
    assert str(got[0]) == "not an image Pillow can read (unknown format or empty file)"
    r, w = os.pipe()  # as the shell's <(cat good.jpg) gives it: /dev/fd/N, written meanwhile

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(good.read_bytes())

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert (decode_image(f"/dev/fd/{r}", spec) == decode_image(good, spec)).all()
    finally:
        writer.join(10)
        os.close(r)
    with pytest.raises(ImageError, match=r"^not a regular file \(a device or socket\)$"):
        decode_image("/dev/zero", spec)
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    with pytest.raises(ImageError, match=r"^cannot read the file \(Too many levels of symbolic"):
        decode_image(tmp_path / "a.jpg", spec)
    with pytest.raises(ImageError, match=r"^cannot read the file \(Not a directory\)$"):
        decode_image(good / "x.jpg", spec)
    with pytest.raises(ImageError, match=r"^is a folder, not an image file \(a folder PATH"):
        decode_image(tmp_path, spec)


def test_grayscale_images_are_resized_before_they_become_rgb(
    tmp_path: Path, msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grayscale image (Navcam, Hazcam, 16-bit products) was made RGB at full size, then
    resized three channels at a time (10.3 ms for a 1024 px frame against 7.2): it is resized
    as one channel, with the same pixels for every filter."""
    from marsvision.runtime.preprocess import to_rgb
    from marsvision.runtime.spec import INTERPOLATIONS

    def mode(path: Path) -> str:
        with Image.open(path) as img:
            return img.mode

    gray = [p for p in sorted((msl_dir / "calibrated").glob("*.JPG"))[:400] if mode(p) == "L"][:3]
    assert gray, "the MSL set has grayscale images"
    deep = tmp_path / "deep.png"  # 12-bit data in a 16-bit file
    Image.fromarray((np.arange(300 * 200).reshape(200, 300) % 4096).astype(np.uint16)).save(deep)
    resized: list[str] = []
    resize = Image.Image.resize

    def recorded(img: Image.Image, *args: Any, **kwargs: Any) -> Image.Image:
        resized.append(img.mode)
        return resize(img, *args, **kwargs)

    for interp in INTERPOLATIONS:
        spec = dataclasses.replace(PreprocessSpec.for_input_size(64), interpolation=interp)
        for path in [*gray, deep]:
            with Image.open(path) as img:
                want = to_rgb(img).resize(
                    resized_size(*img.size, spec.resize_size),
                    Image.Resampling[interp.upper()],
                )
            left, top = (round((n - 64) / 2.0) for n in want.size)  # as decode_image crops
            monkeypatch.setattr(Image.Image, "resize", recorded)
            got = decode_image(path, spec)
            monkeypatch.undo()
            assert (got == np.asarray(want)[top : top + 64, left : left + 64]).all(), (path, interp)
    assert set(resized) == {"L"}


def test_running_out_of_memory_and_a_nul_say_so(
    tmp_path: Path, msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory while decoding gave the error row "cannot read image (MemoryError: )";
    it says what happened, and stays a row (a 48-byte file can claim gigabytes: a run stopped
    there would stop there again on --resume). A path holding a NUL character was a "corrupt or
    truncated image"."""
    from marsvision.runtime import preprocess

    spec = PreprocessSpec.for_input_size(64)
    path = _msl_images(msl_dir, 1)[0]
    w, h = Image.open(path).size

    def no_memory(img: Image.Image) -> Image.Image:
        raise MemoryError

    monkeypatch.setattr(preprocess, "to_rgb_or_l", no_memory)
    with pytest.raises(ImageError, match=rf"^not enough memory to decode it \({w}x{h} pixels\) "):
        decode_image(path, spec)
    monkeypatch.undo()
    for nul in (f"{path}\0.jpg", os.fsencode(path) + b"\0"):
        with pytest.raises(ImageError, match=r"^not a file name: it holds a NUL character$"):
            decode_image(nul, spec)


def test_float_images_with_no_data_pixels(tmp_path: Path) -> None:
    """A float image in [0, 1] with NaN ("no data") pixels keeps its brightness: the NaN pixels
    are black, the rest scaled as without them."""
    spec = PreprocessSpec.for_input_size(64)
    a = np.linspace(0.0, 1.0, 80 * 60, dtype=np.float32).reshape(60, 80)
    clean = decode_image(_save(tmp_path, "clean.tif", Image.fromarray(a, mode="F")), spec)
    a[0, :] = np.nan  # a row outside the center crop
    a[25:35, 35:45] = np.nan  # a block in its middle: output pixels about 28-37
    a[10, 10] = np.inf
    holes = decode_image(_save(tmp_path, "holes.tif", Image.fromarray(a, mode="F")), spec)
    assert float(clean.mean()) > 100
    assert int(holes[29:36, 29:36].max()) <= 2  # black
    rest = np.ones(holes.shape[:2], dtype=bool)
    rest[22:44, 22:44] = False
    assert float(np.abs(holes[rest].astype(float) - clean[rest].astype(float)).mean()) < 1.0


def test_deep_images_are_scaled_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit, 32-bit and float images were scaled in float64 whole, about 25 bytes a pixel
    (2.2 GB for a 170 KB 16-bit PNG; four at once in mars-infer -j 4: 8.4 GB). They are scaled
    a block of rows at a time now, with the same arithmetic: the same bytes out."""
    import tracemalloc

    from marsvision.runtime import preprocess

    def whole(img: Image.Image) -> np.ndarray:  # the scaling before, all at once
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(a.max(initial=0))
        top = (
            1.0
            if img.mode == "F" and peak <= 1.0
            else next((2.0**b - 1 for b in preprocess.DATA_BITS if peak <= 2**b - 1), peak)
        )
        return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)  # fmt: skip

    rng = np.random.default_rng(0)
    floats = rng.random((300, 200), dtype=np.float32)
    floats[5, :] = np.nan
    floats[250, 7] = np.inf
    images = [
        Image.fromarray(rng.integers(0, 4096, (300, 200), dtype=np.uint16)),  # 12-bit data
        Image.fromarray(rng.integers(0, 65536, (300, 200), dtype=np.uint16)),
        Image.fromarray(rng.integers(-5, 3_000_000, (300, 200), dtype=np.int32)),
        Image.fromarray(floats, mode="F"),
        Image.fromarray(floats * 3000, mode="F"),
    ]
    # blocks of 7 rows, the last one short (raising=False: the code before had no blocks)
    monkeypatch.setattr(preprocess, "_BLOCK_PIXELS", 7 * 200 + 50, raising=False)
    for img in images:
        out = np.asarray(preprocess.to_rgb(img))
        assert (out == whole(img)[..., None]).all(), img.mode
    monkeypatch.undo()
    big = Image.fromarray(rng.integers(0, 4096, (2000, 2000), dtype=np.uint16))
    tracemalloc.start()
    try:
        preprocess.to_rgb(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2000 * 2000, peak / 4e6  # 2 bytes a pixel in, 1 out, blocks: 4.4; 24 before


def test_unreadable_file_raises_image_error(
    tmp_path: Path, msl_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file this user may not read is an error row that says so. Root reads files whatever
    their mode (the sessions here run as root, where a chmod 0 file tested nothing): there the
    refusal is the file system's, faked."""
    p = tmp_path / "secret.jpg"
    p.write_bytes(_msl_images(msl_dir, 1)[0].read_bytes())
    p.chmod(0)
    if os.geteuid() == 0:
        from marsvision.runtime import preprocess

        def refused(path: Any, *args: Any) -> int:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))

        monkeypatch.setattr(preprocess.os, "open", refused)
    with pytest.raises(ImageError, match="^permission denied$"):
        decode_image(p, PreprocessSpec.for_input_size(64))


def test_decompression_bomb_guard(tmp_path: Path) -> None:
    spec = PreprocessSpec.for_input_size(64)
    p = _save(tmp_path, "big.png", Image.new("L", (4000, 3000)))
    with pytest.raises(ImageError, match="decompression-bomb"):
        decode_image(p, spec, max_pixels=10_000_000)
    assert decode_image(p, spec).shape == (64, 64, 3)


def _with_scans(data: bytes, extra: int) -> bytes:
    """A progressive JPEG with its first AC scan repeated `extra` more times (still valid)."""
    i, scans = 2, []
    while data[i + 1] != 0xD9:  # EOI
        if data[i + 1] == 0xDA:  # SOS: its header, then entropy-coded data up to a marker
            j = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
            while not (data[j] == 0xFF and data[j + 1] != 0 and not 0xD0 <= data[j + 1] <= 0xD7):
                j += 1
            scans.append((i, j))
            i = j
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    start, end = next((a, b) for a, b in scans if data[a + 5 + 2 * data[a + 4]] > 0)  # Ss > 0
    return data[:-2] + data[start:end] * extra + data[-2:]


def test_a_fifo_that_sends_nothing_or_too_much_is_an_error_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO named like an image whose writer holds it open and sends nothing was read in a
    blocking read: the run waited for it for ever, and a stop (Ctrl-C, SIGTERM) waited for its
    decoding thread. Now it is an error row after FIFO_IDLE_S, or at once once the command is
    stopped; one that sends more than FIFO_MAX_BYTES is no image."""

    from marsvision.runtime import errors, preprocess

    spec = PreprocessSpec.for_input_size(64)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    monkeypatch.setattr(preprocess, "FIFO_IDLE_S", 0.5)
    monkeypatch.setattr(preprocess, "FIFO_MAX_BYTES", 1000)

    def decode(writer_sends: bytes | None, stop: bool = False) -> BaseException | None:
        t, got = _decoding(fifo, spec)
        w = os.open(fifo, os.O_RDWR)  # a writer that holds it open (O_RDWR: no wait for a reader)
        try:
            t.start()
            if writer_sends is not None:
                os.write(w, writer_sends)
            if stop:
                errors.stopping.set()
            t.join(10)
        finally:
            errors.stopping.clear()
            os.close(w)
        t.join(10)
        assert not t.is_alive(), "decoding a FIFO that sends nothing waited for its writer"
        return got[0] if got else None

    start = time.monotonic()
    e = decode(None)
    assert isinstance(e, ImageError) and 0.5 <= time.monotonic() - start < 5
    assert str(e) == (
        "a FIFO whose writer sent nothing for 0.5 s (a named pipe: what its writer sends is read "
        "as the image)"
    )
    monkeypatch.setattr(preprocess, "FIFO_IDLE_S", 60.0)
    start = time.monotonic()
    e = decode(b"", stop=True)
    assert isinstance(e, ImageError) and time.monotonic() - start < 5
    assert str(e) == "not read: the command was stopped while waiting for this FIFO"
    e = decode(b"\0" * 4000)
    assert isinstance(e, ImageError) and str(e) == "a FIFO that sent more than 0 MiB: no image"


def test_progressive_jpegs_of_too_many_scans_are_refused(tmp_path: Path) -> None:
    """Each scan of a progressive JPEG decodes the whole image again: one scan repeated 4,000
    times made a 600 KB file take 19 s of CPU. More than MAX_JPEG_SCANS is an error row, found
    before decoding; a FIFO's file is counted too."""
    limit = 100  # MAX_JPEG_SCANS
    spec = PreprocessSpec.for_input_size(64)
    buf = io.BytesIO()
    Image.new("L", (256, 192), 128).save(buf, "JPEG", progressive=True)
    plain = buf.getvalue()
    scans = plain.count(b"\xff\xda")
    assert 2 < scans < 20
    ok = tmp_path / "ok.jpg"
    ok.write_bytes(_with_scans(plain, limit - scans))
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(_with_scans(plain, limit - scans + 1))
    assert int(decode_image(ok, spec).mean()) in (127, 128, 129)
    # counted in the image only: not in a segment (an APP1 of 200 pairs), nor after its end (a
    # motion photo's video, appended: 116 pairs refused a good file)
    app = b"\xff\xe1" + (2 + 400).to_bytes(2, "big") + b"\xff\xda" * 200
    extras = tmp_path / "extras.jpg"
    extras.write_bytes(plain[:2] + app + plain[2:] + b"\xff\xda" * 200)
    assert (decode_image(extras, spec) == decode_image(ok, spec)).all()
    with pytest.raises(ImageError, match=r"^progressive JPEG of more than 100 scans"):
        decode_image(bomb, spec)
    assert bomb.stat().st_size < 60_000  # fits a pipe's buffer
    r, w = os.pipe()
    with os.fdopen(w, "wb") as f:
        f.write(bomb.read_bytes())
    try:
        with pytest.raises(ImageError, match=r"^progressive JPEG of more than 100 scans"):
            decode_image(f"/dev/fd/{r}", spec)
    finally:
        os.close(r)


def test_fast_decode_is_approximate(msl_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Draft decoding changes pixels when the image is >= 2x the resize: it stays opt-in. It
    decodes at no less than the resized size, so the pixels stay close (a draft at half that
    size doubled the difference)."""
    from PIL import JpegImagePlugin

    drafted = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def recorded(img: Any, mode: Any, size: Any) -> Any:
        before = img.size
        out = draft(img, mode, size)
        drafted.append((size, before, img.size))
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recorded)
    spec = PreprocessSpec.for_input_size(64)
    diffs = []
    for path in _msl_images(msl_dir, 12):
        exact, fast = load_image(path, spec), load_image(path, spec, fast_decode=True)
        assert fast.shape == exact.shape
        diffs.append(float(np.abs(fast - exact).mean()))
    assert max(diffs) > 1e-3  # approximate
    assert np.mean(diffs) < 0.03  # 0.019 at the resized size; 0.049 at half of it
    assert len(drafted) == 12
    for (tw, th), before, (w, h) in drafted:
        assert tw <= w < before[0] and th <= h < before[1]  # smaller, not below the resized size


def test_runtime_imports_no_torch() -> None:
    """Every runtime module imports in a fresh interpreter without torch, torchvision or onnx."""
    code = """
import importlib, pkgutil, sys
import marsvision.runtime as rt
names = [m.name for m in pkgutil.walk_packages(rt.__path__, "marsvision.runtime.")]
for n in names:
    importlib.import_module(n)
assert "marsvision.runtime.cli" in names and "marsvision.runtime.backends.tensorrt" in names
bad = sorted(m for m in ("torch", "torchvision", "onnx") if m in sys.modules)
assert not bad, bad
print(len(names))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 10


# What each stage may not import, at any depth of its code (a function's lazy import too):
# runtime is the bottom, then train, export, benchmarks (STYLE.md, "Layout shows the pipeline").
_BARRED = {
    "runtime": ("torch", "torchvision", "onnx", "marsvision.train", "marsvision.export",
                "marsvision.benchmarks"),
    "train": ("marsvision.export", "marsvision.benchmarks"),
    "export": ("marsvision.benchmarks",),
}  # fmt: skip


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an absolute import statement in `path` names, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import"
            found.append((node.lineno, node.module or ""))
    return found


def test_stages_import_only_the_stages_below() -> None:
    """No stage imports a stage above it or, in the runtime, torch or onnx, even inside a
    function (the bare-interpreter import above sees only what importing runs): training's
    INT8 distillation read the CPU's name from benchmarks."""
    repo = Path(__file__).resolve().parents[1]
    wrong = [
        f"{path.relative_to(repo)}:{line}: {name}"
        for stage, barred in _BARRED.items()
        for path in sorted((repo / stage).rglob("*.py"))
        for line, name in _imports(path)
        if any(name == b or name.startswith(b + ".") for b in barred)
    ]
    assert not wrong, wrong
    assert "marsvision.train.data" in {n for _, n in _imports(repo / "export" / "pipeline.py")}


def test_thin_strip_guard(tmp_path: Path) -> None:
    """A 1-pixel-wide strip is tiny as a file, but resizing its short side to the spec's size
    scales the long side with it: refused once the resized image passes the pixel limit."""
    spec = PreprocessSpec.for_input_size(64)  # short side to 73 px
    p = _save(tmp_path, "strip.png", Image.new("L", (1, 2000)))  # 2,000 pixels -> 73 x 146,000
    with pytest.raises(ImageError, match="aspect ratio too extreme"):
        decode_image(p, spec, max_pixels=100_000)
    q = _save(tmp_path, "wide.png", Image.new("L", (600, 100)))  # 600 pixels wide -> 438 x 73
    assert decode_image(q, spec, max_pixels=100_000).shape == (64, 64, 3)


def test_the_smallest_input_and_a_resize_equal_to_the_crop_are_allowed() -> None:
    """32 px is the least ResNet-50 runs on (its last stage keeps one pixel), and a resize equal
    to the crop (resize 224, crop 224: no border cut off) is a valid spec; one pixel less of
    either is refused."""
    assert PreprocessSpec(input_size=32, resize_size=32).resize_size == 32
    assert PreprocessSpec(input_size=224, resize_size=224).input_size == 224
    with pytest.raises(MarsvisionError, match="input size 31 is too small"):
        PreprocessSpec(input_size=31, resize_size=36)
    with pytest.raises(MarsvisionError, match="resize size 223 is smaller than the crop 224"):
        PreprocessSpec(input_size=224, resize_size=223)


def test_the_default_resize_is_the_crop_over_0_875_rounded() -> None:
    """The default spec resizes the shorter side to input/0.875, rounded to the nearest pixel:
    224 -> 256 (torchvision's ImageNet evaluation), 96 -> 110 (109.7, not cut to 109)."""
    assert PreprocessSpec.for_input_size(224).resize_size == 256
    assert PreprocessSpec.for_input_size(96).resize_size == 110
    assert PreprocessSpec.for_input_size(64).resize_size == 73
    assert PreprocessSpec.for_input_size(64, crop_pct=0.5).resize_size == 128


@pytest.mark.parametrize(
    "values",
    [
        {"std": (0.2, 0.0, 0.2)},  # a zero std divides by zero: every pixel inf or NaN
        {"std": (0.2, -0.1, 0.2)},
        {"mean": (0.5, 0.5)},  # two channels: numpy broadcasting fails at the first image
        {"std": (0.2, 0.2, 0.2, 0.2)},
    ],
)
def test_a_spec_whose_normalisation_cannot_work_is_refused(values: dict[str, Any]) -> None:
    """Mean and std are three finite numbers each and every std is positive; anything else is
    refused when the spec is made, not met at the first image."""
    with pytest.raises(MarsvisionError, match="three finite numbers each, std positive"):
        PreprocessSpec(input_size=64, resize_size=73, **values)


def test_a_spec_dict_without_the_optional_keys_reads_the_documented_defaults() -> None:
    """A spec written without interpolation, mean or std (the keys that have defaults) is read
    as bilinear with the ImageNet mean and std, each in its place; the sizes are required."""
    spec = PreprocessSpec.from_dict({"input_size": 64, "resize_size": 73})
    assert spec == PreprocessSpec(input_size=64, resize_size=73)
    assert spec.interpolation == "bilinear"
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
    with pytest.raises(MarsvisionError, match="has no 'resize_size'"):
        PreprocessSpec.from_dict({"input_size": 64})
    full = PreprocessSpec(input_size=96, resize_size=110, interpolation="bicubic",
                          mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))  # fmt: skip
    assert PreprocessSpec.from_dict(full.to_dict()) == full


def test_a_spec_dict_with_an_unknown_key_or_a_boolean_is_refused() -> None:
    """A key this version does not know (a newer spec's crop setting, a misspelt name) would be
    dropped silently and the images prepared otherwise than the model was trained on; True in
    a mean is not a number written by to_dict."""
    d = PreprocessSpec.for_input_size(64).to_dict()
    with pytest.raises(MarsvisionError, match=r"unknown keys: \['crop_pct'\]"):
        PreprocessSpec.from_dict({**d, "crop_pct": 0.9})
    with pytest.raises(MarsvisionError, match="mean and std must be numbers"):
        PreprocessSpec.from_dict({**d, "mean": [True, 0.456, 0.406]})
    with pytest.raises(MarsvisionError, match="sizes must be whole numbers"):
        PreprocessSpec.from_dict({**d, "input_size": True})
