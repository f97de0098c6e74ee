"""Image file -> network input, with Pillow and numpy, exactly as `runtime/spec.py` defines it.

Parity with the torchvision reference (`train/transforms.py: eval_transform`) is exact up to
float rounding: the same Pillow resize, torchvision's crop rounding, and normalization done
through a per-channel lookup table computed with the same float32 operations as
`ToTensor` + `Normalize`. `fast_decode=True` lets Pillow decode large JPEGs at 1/2, 1/4 or
1/8 scale (`Image.draft`) before the resize: faster, but approximate (pixels differ).
"""

from __future__ import annotations

import errno
import io
import os
import re
import select
import stat
import time
from collections.abc import Iterator
from functools import lru_cache
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from marsvision.runtime.errors import MarsvisionError, stopping
from marsvision.runtime.inputs import GLOB_CHARS
from marsvision.runtime.spec import PreprocessSpec

# Images above this many pixels are refused before decoding (decompression-bomb guard);
# Pillow's own warning threshold, about 9459 x 9459.
MAX_PIXELS = 89_478_485
# A progressive JPEG decodes the whole image again for each of its scans (a camera's or
# encoder's has about 10): one small scan repeated made a 600 KB file take 19 s of CPU.
MAX_JPEG_SCANS = 100


class ImageError(Exception):
    """One input image cannot be used (unreadable, corrupt, too large): becomes an error row."""


@lru_cache(maxsize=16)
def _lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: uint8 value -> normalized value, as ToTensor then Normalize compute it."""
    v = np.arange(256, dtype=np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return np.ascontiguousarray((v[None, :] - m) / s, dtype=np.float32)


@lru_cache(maxsize=1)
def raster_formats() -> tuple[str, ...]:
    """Every format Pillow reads but EPS, whose reader runs Ghostscript on the file: any file
    named like an image could start it."""
    Image.init()
    return tuple(f for f in Image.ID if f != "EPS")


def resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to `resize_size`, rounding as torchvision does."""
    if width <= height:
        return resize_size, int(resize_size * height / width)
    return int(resize_size * width / height), resize_size


# Bit depths a camera product stores in a 16- or 32-bit file (Mastcam and MAHLI: 12 bits)
DATA_BITS = (8, 10, 12, 14, 16)


_BLOCK_PIXELS = 1 << 18


def _float_rows(raw: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float64 block) of a 2-D image, 262,144 pixels at a time, non-finite pixels
    0 (one NaN made the peak NaN: the scale then fell to 255 and the whole image to black). The
    whole image in float64 took about 25 bytes a pixel: 2.2 GB for a 170 KB 16-bit PNG."""
    rows = max(1, _BLOCK_PIXELS // max(1, raw.shape[1]))
    for i in range(0, raw.shape[0], rows):
        block = raw[i : i + rows].astype(np.float64)
        yield i, np.nan_to_num(block, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: how mars-infer, the PyTorch reference and training decode
    (`to_rgb_or_l`, then RGB)."""
    out = to_rgb_or_l(img)
    return out if out.mode == "RGB" else out.convert("RGB")


def to_rgb_or_l(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, or 8-bit grayscale ("L") for a grayscale image, which
    `decode_image` resizes before it becomes RGB: the same pixels for every filter, a third of
    the resizing and no full-size RGB copy (a 1024 px Navcam frame decoded in 7.2 ms against
    10.3, 2 vCPUs).

    Grayscale images of more than 8 bits (16-bit PNG and TIFF, 32-bit integer or float TIFF)
    are scaled, not clipped: by the smallest bit depth of DATA_BITS that holds their brightest
    pixel (a 12-bit product in a 16-bit file scaled as 16-bit was nearly black, and labelled as
    one), above 16 bits by that pixel; a float image in [0, 1] by 1. The non-finite pixels of
    a float image, the NaN "no data" of planetary products, are black. A 16-bit colour file
    reaches here as Pillow reads it, 8-bit RGB of each value's high byte (12-bit data comes
    out dark)."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        raw = np.asarray(img)
        peak = max((float(b.max(initial=0)) for _, b in _float_rows(raw)), default=0.0)
        if img.mode == "F" and peak <= 1.0:
            top = 1.0  # float image in [0, 1]
        else:
            top = next((2.0**b - 1 for b in DATA_BITS if peak <= 2**b - 1), peak)
        a8 = np.empty(raw.shape, np.uint8)
        for i, b in _float_rows(raw):  # in place: one block of float64 at a time
            b *= 255.0 / top
            a8[i : i + len(b)] = np.clip(np.rint(b, out=b), 0, 255, out=b)
        return Image.fromarray(a8, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


# out of file descriptors or kernel memory: every image would get an error row (64 of 64 under
# `ulimit -n 8`), which --resume keeps and never tries again
_LIMITS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


# a FIFO's writer that sends nothing for this long gets an error row (a blocking read of it
# held the run, and a stop waited for it: the decoding threads are joined); more than this
# many bytes from one is no image (`cat /dev/zero > pipe.jpg`)
FIFO_IDLE_S = 60.0
FIFO_MAX_BYTES = 1 << 30


def _open_file(path: str | bytes | os.PathLike[str]) -> BinaryIO:
    """The file at `path`, open for reading. A FIFO is opened without waiting for a writer (one
    without a writer reads as empty; `<(cat image.jpg)` reads its image) and read whole here
    (Pillow reads a stream it cannot seek whole too), and a device or socket is refused
    (/dev/zero would be read forever). Windows has neither O_NONBLOCK nor FIFOs: a plain binary
    open there."""
    nonblock = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fsdecode(path))
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise ImageError("not a regular file (a device or socket)")
        if not (stat.S_ISFIFO(mode) and nonblock):
            if nonblock:
                os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    try:  # a FIFO: read whole here, the descriptor closed once (a stop may come at any point)
        return _read_fifo(fd)
    finally:
        os.close(fd)


def _read_fifo(fd: int) -> io.BytesIO:
    """All that a FIFO (opened non-blocking) sends until its writers close it, in one buffer; an
    ImageError where the writer sends nothing for FIFO_IDLE_S, more than FIFO_MAX_BYTES, or the
    command is stopped meanwhile."""
    buf = io.BytesIO()
    last = time.monotonic()
    poll = select.poll()  # not select(): it takes no descriptor above 1023
    poll.register(fd, select.POLLIN)
    while True:
        if stopping.is_set():
            raise ImageError("not read: the command was stopped while waiting for this FIFO")
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:  # a writer there, nothing sent yet
            if time.monotonic() - last > FIFO_IDLE_S:
                raise ImageError(
                    f"a FIFO whose writer sent nothing for {FIFO_IDLE_S:g} s (a named pipe: "
                    "what its writer sends is read as the image)"
                ) from None
            poll.poll(100)
            continue
        if not data:  # no writer, or its writers are done
            buf.seek(0)
            return buf
        buf.write(data)
        last = time.monotonic()
        if buf.tell() > FIFO_MAX_BYTES:
            raise ImageError(f"a FIFO that sent more than {FIFO_MAX_BYTES >> 20} MiB: no image")


# A marker that starts a segment (or ends the image): FF (fill FFs too) and a byte that is not a
# stuffed 00, TEM or a restart marker, which have no length; found at C speed (a loop over each
# FF byte took 2 s for 20 MB of data).
_SEGMENT = re.compile(rb"\xff+([^\x00\x01\xd0-\xd7\xff])")


def _jpeg_scans(fp: Any) -> int:
    """How many scans (start-of-scan markers) a JPEG file's image holds, counted up to one past
    MAX_JPEG_SCANS, segment by segment: a segment's contents (an EXIF thumbnail's own scan) and
    what follows the end-of-image marker (a motion photo's video) are not counted, and the
    entropy-coded data after a scan's header holds FF only as FF 00 or a restart marker. The
    file position is kept."""
    pos = fp.tell()
    fp.seek(0)
    try:
        data = fp.read()
    finally:
        fp.seek(pos)
    n, i = 0, 2  # after the start-of-image marker
    while n <= MAX_JPEG_SCANS and (found := _SEGMENT.search(data, i)):
        at = found.start(1)  # the marker byte: fill bytes, stuffed FFs, RSTn and TEM passed over
        if data[at] == 0xD9:  # end of image
            break
        n += data[at] == 0xDA
        i = at + 1 + int.from_bytes(data[at + 1 : at + 3], "big")  # the segment, skipped whole
    return n


def _grey_fill_rows(img: Image.Image) -> int:
    """How many rows at the bottom of a decoded JPEG are 128 in every band: where its data
    ends before the image does, libjpeg warns (Pillow keeps no warning) and fills the rest with
    mid-grey, so a file cut short, or with lost packets, that still ends in an end marker
    decoded `ok`; one without the marker is "truncated". No image of the MSL set has even its
    last row so (0 of 6,691). 0 for an image that is grey all over: that may be its picture."""
    w, h = img.size
    if not (np.asarray(img.crop((0, h - 1, w, h))) == 128).all():
        return 0
    pictured = np.flatnonzero(~(np.asarray(img).reshape(h, -1) == 128).all(axis=1))
    return h - int(pictured[-1]) - 1 if len(pictured) else 0


def decode_image(
    path: str | bytes | os.PathLike[str] | io.BytesIO,
    spec: PreprocessSpec,
    *,
    fast_decode: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode, resize and center-crop one file (or an encoded image held in memory, a BytesIO:
    the same checks): uint8 (input_size, input_size, 3)."""
    file = None if isinstance(path, io.BytesIO) else path
    if file is not None and "\0" in os.fsdecode(file):  # os.open's ValueError: a corrupt image
        raise ImageError("not a file name: it holds a NUL character")
    size = ""  # in the out-of-memory row
    try:
        with (
            path if isinstance(path, io.BytesIO) else _open_file(path) as f,
            Image.open(f, formats=raster_formats()) as img,
        ):
            w, h = img.size
            size = f" ({w}x{h} pixels)"
            if w * h > max_pixels:
                raise ImageError(
                    f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                    "(decompression-bomb guard)"
                )
            if w < 1 or h < 1:
                raise ImageError(f"image has no pixels ({w}x{h})")
            tw, th = resized_size(w, h, spec.resize_size)
            if tw * th > max_pixels:  # a thin strip's short side is resized up, the long with it
                raise ImageError(
                    f"image is {w}x{h}: its shorter side resized to {spec.resize_size} px makes "
                    f"it {tw}x{th} pixels, more than the limit of {max_pixels} (aspect ratio "
                    "too extreme)"
                )
            if img.format in ("JPEG", "MPO") and img.info.get("progressive"):
                scans = _jpeg_scans(img.fp)
                if scans > MAX_JPEG_SCANS:
                    raise ImageError(
                        f"progressive JPEG of more than {MAX_JPEG_SCANS} scans (each one "
                        "decodes the whole image again: a decoding-time bomb)"
                    )
            if fast_decode and img.format in ("JPEG", "MPO"):  # MPO: many cameras' JPEGs
                img.draft("RGB", (tw, th))
            img.load()
            if img.format in ("JPEG", "MPO"):
                grey = _grey_fill_rows(img)
                if grey:
                    raise ImageError(
                        f"corrupt or truncated image: the JPEG's data ends early, its last "
                        f"{grey} of {img.size[1]} rows are the decoder's grey fill (a file cut "
                        "short, lost packets, with an end marker after them)"
                    )
            pic = to_rgb_or_l(img)
            if pic.size != (tw, th):
                pic = pic.resize((tw, th), Image.Resampling[spec.interpolation.upper()])
            rgb = pic if pic.mode == "RGB" else pic.convert("RGB")
    except ImageError:
        raise
    except MemoryError:  # it was "cannot read image (MemoryError: )"; a row, not a stop: a
        # 48-byte file can claim gigabytes, and a run stopped there would stop there again
        raise ImageError(
            f"not enough memory to decode it{size} (a limit of this process or machine, or a "
            "damaged file that claims more data than it holds)"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression-bomb guard: {e}") from None
    except FileNotFoundError:
        if GLOB_CHARS & set(os.fsdecode(file or "")):  # a PATH pattern that matched nothing
            raise ImageError(  # or a pattern in an @list: each line there is one file's name
                "no file matches this pattern (or, in an @list, where patterns are not "
                "expanded, no file has this name)"
            ) from None
        raise ImageError("file not found (or a broken symlink)") from None
    except IsADirectoryError:
        raise ImageError(  # a folder PATH with no image files in it, or a folder in an @list
            "is a folder, not an image file (a folder PATH stands for the image files directly "
            "in it, and with --recursive in its subfolders too: this one has none; a folder "
            "named in an @list is not looked into)"
        ) from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (unknown format or empty file)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, OSError) and e.errno in _LIMITS and file is not None:  # the run's
            raise MarsvisionError(
                f"cannot open {os.fsdecode(file)} ({e.strerror}): a limit of this process or "
                "machine, not a fault of the image; raise it (ulimit -n) or open fewer files at "
                "once, and run again (mars-infer: --resume continues)"
            ) from None
        if isinstance(e, OSError) and e.errno is not None:  # the file system's, not the decoder's
            raise ImageError(f"cannot read the file ({e.strerror})") from None
        raise ImageError(f"corrupt or truncated image ({type(e).__name__}: {e})") from None
    c = spec.input_size
    left = round((tw - c) / 2.0)  # torchvision's CenterCrop rounding
    top = round((th - c) / 2.0)
    a = np.asarray(rgb)
    return a[top : top + c, left : left + c]


def normalize_into(rgb: np.ndarray, spec: PreprocessSpec, out: np.ndarray) -> None:
    """uint8 HWC -> normalized float32 CHW, written into `out` (3, H, W)."""
    lut = _lut(tuple(spec.mean), tuple(spec.std))
    for ch in range(3):
        np.take(lut[ch], rgb[:, :, ch], out=out[ch])


def load_image(
    path: str | os.PathLike[str], spec: PreprocessSpec, *, fast_decode: bool = False
) -> np.ndarray:
    """One image file -> float32 (3, input_size, input_size), normalized per `spec`."""
    out = np.empty((3, spec.input_size, spec.input_size), dtype=np.float32)
    normalize_into(decode_image(path, spec, fast_decode=fast_decode), spec, out)
    return out
