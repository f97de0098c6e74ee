"""Atomic writes' temporary names, a file's identity and the output folder's lock
(runtime/files.py): cases the mutation audit found unchecked."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from marsvision.runtime.errors import MarsvisionError


def test_a_file_rewritten_in_place_with_its_times_kept_changes_identity(tmp_path: Path) -> None:
    """`cp -p` over a file: the same inode, the same size and the same mtime; only the ctime
    says it was rewritten (the resume hint and the classifier's model check rely on it)."""
    from marsvision.runtime.files import file_identity

    path = tmp_path / "resume.pt"
    path.write_bytes(b"an earlier run's")
    before = file_identity(path)
    st = os.stat(path)
    time.sleep(0.05)  # past the file system's coarse clock
    with open(path, "r+b") as f:  # rewritten in place: same inode, same size
        f.write(b"a new run's file")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p puts the times back
    assert os.stat(path).st_ino == st.st_ino and os.stat(path).st_size == st.st_size
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert file_identity(path) != before
    assert file_identity(tmp_path / "gone") is None


def test_a_temporary_folder_name_already_taken_is_not_used_nor_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staging or unpacking folder whose drawn name another run holds: another name is drawn,
    and the other run's folder is left as it was (not written into, not removed)."""
    from marsvision.runtime import files

    draws = iter(["0000", "0001"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(draws))
    theirs = tmp_path / ".staging.0000"
    theirs.mkdir()
    (theirs / "model.onnx").write_bytes(b"theirs")
    with files.temporary(tmp_path, ".staging.", folder=True) as tmp:
        assert tmp == tmp_path / ".staging.0001" and tmp.is_dir()
        (tmp / "model.onnx").write_bytes(b"ours")
    assert (theirs / "model.onnx").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging.0000"]


def test_a_released_folder_lock_is_let_go_once(tmp_path: Path) -> None:
    """After `release` the lock says it holds nothing, another run may take the folder, and a
    second release (the `with` block's end after an explicit one) closes no other file."""
    from marsvision.runtime.files import FolderLock

    with FolderLock() as lock:
        lock.acquire(tmp_path, "mars-train")
        assert lock.held
        with pytest.raises(MarsvisionError, match="in use by another mars-train"):
            FolderLock().acquire(tmp_path, "mars-train")
        lock.release()
        assert not lock.held
        with FolderLock() as other:
            other.acquire(tmp_path, "mars-train")
            assert other.held
        with open(tmp_path / "other.txt", "w") as f:  # may reuse the lock's descriptor number
            lock.release()
            f.write("still open")  # a second release closed it: OSError (EBADF) at the flush
        lock.acquire(tmp_path, "mars-train")  # taken again, not a no-op
        assert lock.held
    assert not lock.held


def test_an_atomic_write_is_on_the_disk_before_its_rename_and_the_rename_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename alone may reach the disk before the data it names: a power cut soon after left
    an empty manifest or checkpoint under the final name. The order: the temporary file's data,
    the rename, the folder's entry."""
    from marsvision.runtime.files import atomic_write_text

    events: list[str] = []
    fsync, replace = os.fsync, os.replace

    def synced(fd: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def replaced(src: str, dst: str) -> None:
        events.append(f"replace {Path(dst).name}")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", replaced)
    atomic_write_text(tmp_path / "manifest.json", "{}\n")
    assert len(events) == 3, events
    assert events[0].startswith(f"fsync {tmp_path}/.manifest.json.")
    assert events[1:] == ["replace manifest.json", f"fsync {tmp_path}"]
    assert (tmp_path / "manifest.json").read_text() == "{}\n"
