"""Atomic file writes (a temporary name in the target's folder, then a rename), the check that
an output folder can be written before any work starts, and the lock one run holds on it.

A crash or kill mid-write leaves the old file (or none), never a half-written one that looks
valid; the data is on the disk before the rename (a power cut too). New files get the usual
permissions (0666 less the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from marsvision.runtime.errors import MarsvisionError


def _umask() -> int:
    """The process umask, read from /proc where Linux has it there (4.7 and later): setting it
    to read it, the only other way, leaves it 0 for a moment, and a file another thread makes
    then is open to all."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_identity(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """What changes when a file is replaced or rewritten (None: not there)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns  # ctime: `cp -p`


def default_file_mode() -> int:
    """0o666 less the process umask: what open() would give a new file."""
    return 0o666 & ~_umask()


def default_folder_mode() -> int:
    """0o777 less the process umask: what mkdir would give a new folder (mkdtemp gives 0o700)."""
    return 0o777 & ~_umask()


@contextmanager
def temporary(
    parent: Path, prefix: str, suffix: str = "", *, folder: bool = False
) -> Iterator[Path]:
    """A new temporary file (empty, 0600) or folder (0700) in `parent`, removed on the way out
    unless renamed away meanwhile. Its name is drawn before it is made, inside the block that
    removes it: a SIGTERM or Ctrl-C as mkstemp or mkdtemp returned (made, its name not yet held)
    left it behind. A name already taken is drawn again, and not removed (not ours)."""
    tmp: Path | None = None
    try:
        while tmp is None:
            tmp = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"  # as long as mkstemp's
            try:
                if folder:
                    os.mkdir(tmp, 0o700)
                else:
                    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                tmp = None
        yield tmp
    finally:
        if tmp is not None and folder:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            tmp.unlink(missing_ok=True)


def _fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file's data, or a folder's entries, to the disk. Where the OS cannot (a folder
    on Windows, a file system without fsync on folders) nothing happens; a failed write-back
    (EIO, a full disk) is the OSError it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def replace_durably(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """`os.replace(src, dst)` with `src`'s data on the disk before the rename and the rename on
    the disk after it: without the first, a power cut or kernel crash soon after could leave an
    empty or cut file under the final name (the rename may reach the disk before the data), which
    the next run read as a damaged checkpoint, manifest or record."""
    _fsync(src)
    os.replace(src, dst)
    _fsync(Path(dst).parent)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, else removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with temporary(final.parent, f".{final.name}.", ".tmp") as tmp:
        yield tmp
        os.chmod(tmp, default_file_mode())
        replace_durably(tmp, final)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def check_writable_folder(path: str | os.PathLike[str], option: str) -> None:
    """`path` is, or can become, a folder this process writes into: not a file, and its nearest
    existing ancestor a folder that takes a new file. A one-line MarsvisionError naming `option`
    (the flag that chose `path`) otherwise, also when the file system refuses the path itself (a
    name too long). Creates nothing, so a refused path is left as it was."""
    folder = Path(path)
    parent = folder
    try:
        if folder.exists() and not folder.is_dir():
            raise MarsvisionError(f"{option} {folder} is a file, not a folder")
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise MarsvisionError(f"{option} {folder}: {parent} is not a folder")
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise MarsvisionError(
            f"{option} {folder}: cannot write into {parent} ({e.strerror or e}); "
            f"pass another {option}"
        ) from None


def make_folder(path: str | os.PathLike[str], option: str) -> Path:
    """`check_writable_folder`, then create the folder and its parents; the file system refusing
    the creation (the path changed between the check and now: a file put there, a parent made
    read-only) is the same kind of one-line MarsvisionError naming `option`."""
    check_writable_folder(path, option)
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MarsvisionError(
            f"{option} {folder}: cannot create it ({e.strerror or e}); pass another {option}"
        ) from None
    return folder


def try_exclusive_lock(fd: int) -> bool:
    """flock(LOCK_EX | LOCK_NB) on `fd` (released when it closes): True when held, False where
    there are no locks (not POSIX, some network file systems); BlockingIOError when another
    open file holds it."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError:
        return False
    return True


class FolderLock:
    """An exclusive lock on an output folder for one run, from `acquire` until `release` (or the
    end of a `with` block): a second run into the folder (a script started twice, two runs left
    on the default --out) is refused in one line, instead of each replacing the other's files
    and reporting the other's model. flock on the folder's own descriptor: no lock file is left
    in it, and a killed run's lock goes with its process. Where there are no locks (not POSIX,
    some network file systems), runs go on unlocked."""

    def __init__(self) -> None:
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this lock holds its folder now."""
        return self._fd is not None

    def acquire(self, folder: str | os.PathLike[str], command: str) -> None:
        """Lock `folder` for `command`, or say who holds it (a no-op off POSIX or when held)."""
        if os.name != "posix" or self.held:  # a folder opens as a file on POSIX only
            return
        fd = os.open(folder, os.O_RDONLY)
        try:
            locked = try_exclusive_lock(fd)
        except BlockingIOError:
            os.close(fd)
            raise MarsvisionError(
                f"{folder} is in use by another {command} (it holds the folder's lock): let that "
                "one finish, or pass another --out"
            ) from None
        if locked:
            self._fd = fd
        else:
            os.close(fd)

    def release(self) -> None:
        """Let the folder go (a no-op when not held)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
