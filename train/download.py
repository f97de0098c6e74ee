"""Fetch msl-images.zip from Zenodo, check it, and unpack it into a data directory.

The archive goes to a temporary file beside the destination, is checked (size, and every image
named by the split files is inside), is unpacked into a temporary folder, and only then renamed
to the destination: an interrupted or failed download leaves nothing behind.
`MARS_MSL_URL` overrides the URL (a mirror, or a `file://` path to a local copy).
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from marsvision.runtime.errors import MarsvisionError
from marsvision.runtime.files import check_writable_folder, default_folder_mode, temporary
from marsvision.train.data import SPLIT_FILES, SPLITS, SYNSET_FILE, check_data_set

ZENODO_URL = "https://zenodo.org/records/1049137/files/msl-images.zip?download=1"
URL_ENV = "MARS_MSL_URL"
ARCHIVE_BYTES = 60_635_475  # msl-images.zip on Zenodo (doi:10.5281/zenodo.1049137), ~60.6 MB
SIZE_TOLERANCE = 0.02
# its members hold about 61 MB (JPEGs do not compress); a zip that would unpack to more is not it
UNPACKED_LIMIT = 4 * ARCHIVE_BYTES


LOG_EVERY = 10_000_000  # bytes between two lines of the download's progress in a log


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Stream `url` into the file `dest`, with a byte count on stderr: redrawn in place on a
    terminal; in a log (a carriage return a megabyte there), the URL first and a line every
    LOG_EVERY bytes (it printed nothing until the end, minutes on a slow link)."""
    tty = sys.stderr.isatty()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            of = f" of {total / 1e6:.1f}" if total else ""
            if not tty:
                print(f"downloading {url}{f' ({total / 1e6:.1f} MB)' if total else ''}",
                      file=sys.stderr, flush=True)  # fmt: skip
            done = said = 0
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if tty:
                    print(f"\rdownloading {done / 1e6:.1f}{of} MB", end="", file=sys.stderr)
                elif done // LOG_EVERY > said // LOG_EVERY:
                    print(f"downloaded {done / 1e6:.1f}{of} MB", file=sys.stderr, flush=True)
                    said = done
            if tty or said != done or not done:  # the last count, unless a line just said it
                print("" if tty else f"downloaded {done / 1e6:.1f} MB", file=sys.stderr)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise MarsvisionError(
            f"cannot download {url} ({reason}); check the internet connection, or fetch "
            f"msl-images.zip by hand from {ZENODO_URL} and unzip it into the data directory"
        ) from None


def _archive_root(names: list[str]) -> str:
    """The folder inside the zip that holds the split files ('' or 'something/')."""
    marker = SPLIT_FILES["train"]
    for name in names:
        if PurePosixPath(name).name == marker:
            return name[: -len(marker)]
    raise MarsvisionError(f"the archive holds no {marker}: it is not msl-images.zip")


def _outside(name: str, root: str) -> bool:
    """Whether the member `name` would unpack outside the folder: _extract joins what follows
    the root, so "msl-images//tmp/x" is "/tmp/x" there."""
    unpacked = PurePosixPath(name[len(root) :] if name.startswith(root) else name)
    return name.startswith("/") or unpacked.is_absolute() or ".." in unpacked.parts


def check_archive(path: Path, expected_bytes: int | None = ARCHIVE_BYTES) -> str:
    """Check the zip (size near `expected_bytes` unless None; members safe, and no more than
    UNPACKED_LIMIT bytes unpacked: a mirror's zip bomb of the right size filled the disk; splits
    resolve).

    Returns the folder inside the archive that holds the data set.
    """
    size = path.stat().st_size
    if expected_bytes is not None and abs(size - expected_bytes) > SIZE_TOLERANCE * expected_bytes:
        raise MarsvisionError(
            f"downloaded archive is {size / 1e6:.1f} MB, expected about "
            f"{expected_bytes / 1e6:.1f} MB: incomplete or not msl-images.zip"
        )
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise MarsvisionError(f"{path} is not a zip archive ({e})") from None
    with zf:
        names = zf.namelist()
        root = _archive_root(names)
        members = set(names)
        for name in names:
            if _outside(name, root):
                raise MarsvisionError(f"archive member {name!r} points outside the archive")
        unpacked = sum(i.file_size for i in zf.infolist())
        if unpacked > UNPACKED_LIMIT:
            raise MarsvisionError(
                f"the archive would unpack to {unpacked / 1e6:.0f} MB, more than "
                f"{UNPACKED_LIMIT / 1e6:.0f} MB: it is not msl-images.zip"
            )
        for f in (*SPLIT_FILES.values(), SYNSET_FILE):
            if root + f not in members:
                raise MarsvisionError(f"the archive lacks {root + f}")
        for split in SPLITS:
            try:
                text = zf.read(root + SPLIT_FILES[split]).decode("utf-8")
            except (zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as e:
                raise MarsvisionError(f"{path} is damaged ({e}); download it again") from None
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip() and root + line.split()[0] not in members:
                    raise MarsvisionError(
                        f"the archive's {SPLIT_FILES[split]}:{n} names "
                        f"{line.split()[0]}, which is not in the archive"
                    )
    return root


def _extract(path: Path, root: str, folder: Path) -> None:
    """The members under `root` of the zip into `folder`; a damaged member (check_archive reads
    only the split files) or a full disk is a one-line error."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(root) or info.is_dir():
                    continue
                if _outside(info.filename, root):  # check_archive refuses these first
                    raise MarsvisionError(f"archive member {info.filename!r} points outside it")
                target = folder / info.filename[len(root) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, zlib.error) as e:
        raise MarsvisionError(f"{path} is damaged ({e}); download it again") from None
    except OSError as e:
        raise MarsvisionError(f"cannot unpack {path} into {folder.parent}: {e}") from None


def unpack_archive(path: Path, dest: Path, root: str) -> Path:
    """Unpack the data set folder `root` of the zip to `dest` (temp folder, then rename)."""
    if dest.exists() and any(dest.iterdir()):
        raise MarsvisionError(f"{dest} exists and is not empty; choose an empty or new --data DIR")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with temporary(dest.parent, f".{dest.name}.", ".tmp", folder=True) as tmp:
        _extract(path, root, tmp)
        check_data_set(tmp)  # the unpacked layout must resolve as the trainer reads it
        os.chmod(tmp, default_folder_mode())  # 0o700 while made kept other users out of --data
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    return dest


def download_msl(dest: Path, *, url: str | None = None, timeout: float = 60.0) -> Path:
    """Download, check and unpack the MSL data set into `dest`; returns `dest`."""
    url = url or os.environ.get(URL_ENV) or ZENODO_URL
    if (dest / SPLIT_FILES["train"]).is_file():  # there: checked, not fetched again
        check_data_set(dest)  # an image missing is named (it printed the folder, exit 0)
        print(f"{dest} holds the MSL data set already: nothing downloaded", file=sys.stderr)
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise MarsvisionError(f"{dest} exists and is not empty; choose an empty or new --data DIR")
    check_writable_folder(dest, "--data")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with temporary(dest.parent, ".msl-images.", ".zip") as tmp:
        _fetch(url, tmp, timeout)
        root = check_archive(tmp, ARCHIVE_BYTES)
        return unpack_archive(tmp, dest, root)
