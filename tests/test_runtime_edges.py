"""Edges of the runtime a user meets: folders without images or with hidden files, resuming a
file written with other options or in the other format, CPU affinity, and the source checkpoint
of exports."""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import files_up_to

from marsvision.runtime.errors import MarsvisionError

MARS_INFER = [sys.executable, "-m", "marsvision.runtime.cli"]


def _infer(
    *args: str | os.PathLike[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*MARS_INFER, *(os.fspath(a) for a in args)], capture_output=True, cwd=cwd
    )


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["int8-cpu"]


@pytest.fixture(scope="module")
def images(msl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from marsvision.train.data import read_split

    d = tmp_path_factory.mktemp("imgs")
    out = []
    for s in read_split(msl_dir, "test", "binary", limit=2):
        out.append(d / s.path.name)
        shutil.copy(s.path, out[-1])
    return out


def test_folder_without_images_is_an_error_row(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """A folder whose images are all in subfolders gets an error row (exit 3) that names
    --recursive, instead of an empty, successful run."""
    sub = tmp_path / "top" / "sub"
    sub.mkdir(parents=True)
    shutil.copy(images[0], sub)
    r = _infer(tmp_path / "top", "--engine", model)
    assert r.returncode == 3, r.stderr
    (line,) = r.stdout.decode().splitlines()[1:]
    assert line.startswith(f"{tmp_path / 'top'},error,") and "--recursive" in line
    # the rate counts classified images only: an all-error run reports none
    assert b"0 ok, 1 failed; no image classified in " in r.stderr and b"images/s" not in r.stderr
    r = _infer(tmp_path / "top", "--engine", model, "--recursive")
    assert r.returncode == 0 and len(r.stdout.decode().splitlines()) == 2
    # a pattern that matches nothing says so (it said "file not found (or a broken symlink)")
    r = _infer(f"{tmp_path}/top/*.png", "--engine", model)
    assert r.returncode == 3, r.stderr
    nothing = (
        "no file matches this pattern (or, in an @list, where patterns are not expanded, no file "
        "has this name)"
    )
    (row,) = csv.DictReader(io.StringIO(r.stdout.decode()))
    assert (row["path"], row["status"], row["error"]) == (f"{tmp_path}/top/*.png", "error", nothing)
    # in an @list a pattern is one file's name, not expanded: the row said only "no file matches"
    (tmp_path / "top" / "sub" / "list.txt").write_text(f"{tmp_path}/top/sub/*.png\n")
    r = _infer(f"@{tmp_path}/top/sub/list.txt", "--engine", model)
    (row,) = csv.DictReader(io.StringIO(r.stdout.decode()))
    assert (row["path"], row["error"]) == (f"{tmp_path}/top/sub/*.png", nothing)


def test_folders_skip_hidden_files_and_subfolders(tmp_path: Path) -> None:
    """The `._IMG.JPG` copies a Mac leaves on a card (not images: each would be an error row and
    exit 3) and hidden folders are skipped in a folder, as a glob skips them; a hidden file
    named on its own is kept."""
    from marsvision.runtime.inputs import expand_inputs

    top = tmp_path / "card"
    for rel in ("a.JPG", "._a.JPG", ".Trashes/b.jpg", "sub/c.png", "sub/._c.png", ".d/e/f.jpg"):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).touch()
    shown = [str(top / "a.JPG"), str(top / "sub" / "c.png")]
    assert expand_inputs([str(top)], recursive=True) == shown
    assert expand_inputs([str(top)]) == shown[:1]
    assert expand_inputs([f"{top}/**/*.*"], recursive=True) == shown  # as glob sees the card
    assert expand_inputs([str(top / "._a.JPG")]) == [str(top / "._a.JPG")]
    notes: list[str] = []  # without -r, ** is *: it missed the deeper images without a word
    assert expand_inputs([f"{top}/**/*.*"], notes=notes) == shown[1:]
    assert notes == [f"{top}/**/*.*: without --recursive (-r), ** is one folder level, as * is; "
                     "add -r for any depth"]  # fmt: skip
    notes.clear()  # ** inside a name is * with -r too: nothing to add
    assert expand_inputs([f"{top}/a**.JPG"], notes=notes) == shown[:1] and notes == []


def test_a_folder_says_what_it_passed_over(tmp_path: Path) -> None:
    """A folder PATH without --recursive classified its top level and said nothing of its
    subfolders; JPEG 2000 (planetary archives) and other files were passed over silently. JPEG
    2000 is an image now, and one line per folder says what else was there, one without
    images too (its row said only that it had none)."""
    from marsvision.runtime.inputs import expand_inputs

    top = tmp_path / "mine"
    for rel in ("a.JPG", "b.jp2", "c.J2K", "a.LBL", "b.lbl", "notes", ".hidden", "sub/d.png",
                ".Trashes/x.jpg", "other/e.txt", "._a.JPG", "sub/.d.png"):  # fmt: skip
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).touch()
    notes: list[str] = []
    got = expand_inputs([str(top)], notes=notes)
    assert got == [str(top / n) for n in ("a.JPG", "b.jp2", "c.J2K")]
    assert notes == [
        f"passed over in {top}: 2 subfolders (--recursive descends into them); 1 hidden image "
        "file (a name that starts with '.'; name one to classify it); 3 files not named as images "
        "(.lbl 2, no ending 1; name one to classify it)"
    ]
    notes.clear()
    assert len(expand_inputs([str(top)], recursive=True, notes=notes)) == 4
    assert notes == [f"passed over in {top}: 2 hidden image files (a name that starts with '.'; "
                     "name one to classify it); 4 files not named as images (.lbl 2, no ending "
                     "1, .txt 1; name one to classify it)"]  # fmt: skip
    notes.clear()  # a folder of hidden images alone: its row says "none", the note why
    (tmp_path / "mac").mkdir()
    (tmp_path / "mac" / "._IMG.JPG").touch()
    assert expand_inputs([str(tmp_path / "mac")], notes=notes) == [str(tmp_path / "mac")]
    assert notes == [f"passed over in {tmp_path / 'mac'}: 1 hidden image file (a name that "
                     "starts with '.'; name one to classify it)"]  # fmt: skip
    notes.clear()
    empty = tmp_path / "only-labels"  # no images in it: its error row, and what was there
    (empty / "sub").mkdir(parents=True)
    (empty / "x.lbl").touch()
    (empty / "sub" / "f.jpg").touch()
    assert expand_inputs([str(empty)], notes=notes) == [str(empty)]
    assert notes == [f"passed over in {empty}: 1 subfolder (--recursive descends into them); 1 "
                     "file not named as images (.lbl 1; name one to classify it)"]  # fmt: skip
    notes.clear()
    # a pattern matching only folders without images directly in them (`'sols/*'`): their
    # folder rows and what was there, not "no file matches this pattern"
    pattern = f"{tmp_path}/only-*"
    assert expand_inputs([pattern], notes=notes) == [str(empty)]
    assert notes == [f"passed over in {pattern}: 1 subfolder (--recursive descends into them); "
                     "1 file not named as images (.lbl 1; name one to classify it)"]  # fmt: skip
    assert expand_inputs([pattern], recursive=True) == [str(empty / "sub" / "f.jpg")]
    notes.clear()  # a recursive ** matches folders within folders it matched: each file of
    # them was counted again, once per folder above it
    assert str(empty / "sub" / "f.jpg") in expand_inputs([f"{tmp_path}/**"], recursive=True,
                                                         notes=notes)  # fmt: skip
    assert notes == []


def test_list_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    """An @list saved by Windows Notepad starts with a UTF-8 byte-order mark (and CRLF line
    ends): its first path is read without the mark."""
    from marsvision.runtime.inputs import expand_inputs

    lst = tmp_path / "list.txt"
    lst.write_bytes("\ufeffa.jpg\r\n# a note\r\nb.jpg\r\n".encode())
    assert expand_inputs([f"@{lst}"]) == ["a.jpg", "b.jpg"]


def test_links_to_folders_are_followed_once_and_loops_end(tmp_path: Path) -> None:
    """Two links back up (`loop -> .`) made a `**` glob with --recursive hang (glob followed
    them about 40 levels deep: 2**40 paths); a folder with --recursive skipped a linked
    subfolder without a word while `**` followed it. Both now follow links, each folder once."""
    (tmp_path / "top" / "sub").mkdir(parents=True)
    (tmp_path / "real").mkdir()
    for rel in ("top/a.jpg", "top/sub/b.jpg", "real/c.jpg"):
        (tmp_path / rel).touch()
    for name in ("loop1", "loop2"):
        (tmp_path / "top" / name).symlink_to(".")
    (tmp_path / "top" / "sol").symlink_to(tmp_path / "real")
    code = (
        "import json, sys\n"
        "from marsvision.runtime.inputs import expand_inputs\n"
        "print(json.dumps([expand_inputs([a], recursive=True) for a in sys.argv[1:]]))"
    )
    r = subprocess.run([sys.executable, "-c", code, "top", "top/**/*.jpg"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    folder, pattern = json.loads(r.stdout)
    assert folder == ["top/a.jpg", "top/sol/c.jpg", "top/sub/b.jpg"]
    assert pattern == folder


def test_a_tree_deeper_than_pythons_recursion_limit_is_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk and the `**` matcher recursed once per folder level: a tree some 1,000 folders
    deep (a runaway script's output) ended the run in a RecursionError traceback, no rows."""
    from marsvision.runtime import inputs

    depth = sys.getrecursionlimit() + 100
    monkeypatch.chdir(tmp_path)
    os.mkdir("deep")
    os.chdir("deep")
    for _ in range(depth):  # one level at a time: os.makedirs recurses too
        os.mkdir("a")
        os.chdir("a")
    Path("x.jpg").touch()
    os.chdir(tmp_path)
    want = ["deep/" + "a/" * depth + "x.jpg"]
    try:
        assert inputs.expand_inputs(["deep"], recursive=True) == want
        assert inputs.expand_inputs(["deep/**/*.jpg"], recursive=True) == want
    finally:  # removed here, level by level: shutil.rmtree recurses on Python 3.11
        os.chdir(os.path.dirname(want[0]))
        os.remove("x.jpg")
        for _ in range(depth):
            os.chdir("..")
            os.rmdir("a")


def test_a_folder_that_links_reach_many_ways_is_walked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only links back up were cut: a chain of folders, each with two links to the next (a
    received tarball keeps links), was walked 2**depth times (16 deep: 25 s, 30 deep: days)."""
    from marsvision.runtime import inputs

    depth = 12
    for i in range(depth + 1):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / f"{i}.jpg").touch()
        if i:
            for name in ("a", "b"):
                (tmp_path / f"d{i - 1}" / name).symlink_to(tmp_path / f"d{i}")
    listed = []
    scandir = os.scandir

    def counting(path: Any = ".") -> Any:
        listed.append(path)
        return scandir(path)

    monkeypatch.setattr(inputs.os, "scandir", counting)
    monkeypatch.chdir(tmp_path)
    found = inputs.expand_inputs(["d0"], recursive=True)
    assert found == ["d0/0.jpg", *(f"d0/{'a/' * i}{i}.jpg" for i in range(1, depth + 1))]
    assert len(listed) == depth + 1  # 8191 before
    listed.clear()
    assert inputs.expand_inputs(["d0/**/*.jpg"], recursive=True) == found
    assert len(listed) == depth + 1


def test_a_folder_is_listed_one_entry_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing kept every directory entry until the folder was read (with a link's stat:
    200 MB at peak for 200,000 links, against 23 MB for their names)."""
    from marsvision.runtime import inputs

    alive = [0, 0]  # now, most

    class Entry:
        def __init__(self, name: str) -> None:
            self.name = name
            alive[0] += 1
            alive[1] = max(alive)

        def __del__(self) -> None:
            alive[0] -= 1

        def is_dir(self) -> bool:
            return False

    class Listing:
        def __enter__(self) -> Any:
            return (Entry(f"{i:04d}.jpg") for i in range(1000))

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(inputs.os, "scandir", lambda path: Listing())
    found = inputs.folder_images(str(tmp_path))
    assert len(found) == 1000
    assert alive[1] <= 2


def test_a_pattern_matches_through_a_link_to_a_folder_walked_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pattern that names a link (`**/latest/*.jpg`, `latest -> 2024-06-01`) matched nothing
    once the folder had been walked under its own name: it is walked again where the pattern
    takes the two names differently; each file glob matches is matched, once."""
    import glob

    from marsvision.runtime.inputs import expand_inputs, path_keys

    for cam in ("cam1", "cam2"):
        day = tmp_path / "data" / cam / "2024-06-01"
        day.mkdir(parents=True)
        (day / "x.jpg").touch()
        (day.parent / "latest").symlink_to("2024-06-01")
    monkeypatch.chdir(tmp_path)
    for pattern in ("data/**/latest/*.jpg", "data/**/2024-*/*.jpg", "data/**/*.jpg",
                    "data/*/latest/*.jpg", "**/x.jpg"):  # fmt: skip
        ours = path_keys(expand_inputs([pattern], recursive=True))
        assert sorted(ours) == sorted(set(path_keys(glob.glob(pattern, recursive=True))))
    assert expand_inputs(["data/**/latest/*.jpg"], recursive=True) == [
        "data/cam1/latest/x.jpg", "data/cam2/latest/x.jpg"]  # fmt: skip
    # the spelling kept is the one sorted first, as glob's: `a-b/` sorts before `a/`, a folder
    # `a` before `a-b`: walked first, the link `a/l` was the only spelling left
    (tmp_path / "s" / "a-b").mkdir(parents=True)
    (tmp_path / "s" / "a-b" / "x.jpg").touch()
    (tmp_path / "s" / "a").mkdir()
    (tmp_path / "s" / "a" / "l").symlink_to("../a-b")
    assert expand_inputs(["s/**/*.jpg"], recursive=True) == ["s/a-b/x.jpg"]


def test_recursive_patterns_match_as_glob_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop-safe `**`: a folder reached through a link first is still matched under its own
    name (`latest -> sol1234` and `**/sol1234/*.JPG`); a trailing `/` matches folders only (the
    non-image beside them got an error row); a missing base leaves the pattern its own row."""
    from marsvision.runtime.inputs import expand_inputs

    for rel in ("sol1234/a.JPG", "top/x.jpg", "top/notes.txt", "top/b/y.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    (tmp_path / "latest").symlink_to("sol1234")  # sorts before it
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["**/sol1234/*.JPG"], recursive=True) == ["sol1234/a.JPG"]
    assert expand_inputs(["top/**/"], recursive=True) == ["top/x.jpg", "top/b/y.jpg"]
    assert expand_inputs(["nope/**/*.jpg"], recursive=True) == ["nope/**/*.jpg"]


def test_a_subfolder_that_cannot_be_listed_gets_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.walk passed over a folder it could not list: its images got no row, and the run
    exited 0. It is now an input of its own (whose row says why it cannot be read). Root lists
    any folder, so the refusal is made by hand here."""
    from marsvision.runtime.inputs import expand_inputs

    (tmp_path / "top" / "locked").mkdir(parents=True)
    (tmp_path / "top" / "a.jpg").touch()
    (tmp_path / "top" / "locked" / "b.jpg").touch()
    (tmp_path / "top" / "m" / "sub").mkdir(parents=True)
    (tmp_path / "top" / "m" / "c.jpg").touch()
    (tmp_path / "top" / "m" / "sub" / "d.jpg").touch()
    scandir = os.scandir

    def refuse(path: Any = ".") -> Any:
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    top = str(tmp_path / "top")
    # the locked folder's row where its images would be: before m's (it came last)
    shown = [f"{top}/a.jpg", f"{top}/locked", f"{top}/m/c.jpg", f"{top}/m/sub/d.jpg"]
    assert expand_inputs([top], recursive=True) == shown
    assert expand_inputs([f"{top}/**/*.jpg"], recursive=True) == shown
    assert expand_inputs([f"{top}/locked"], recursive=True) == [f"{top}/locked"]
    # a folder no match could lie in is not listed, so not reported either
    assert expand_inputs([f"{top}/a*"], recursive=True) == [f"{top}/a.jpg"]
    assert expand_inputs([f"{top}/b*/**/*.jpg"], recursive=True) == [f"{top}/b*/**/*.jpg"]


def test_list_files_in_utf16_and_not_text(tmp_path: Path) -> None:
    """Windows PowerShell 5's `>` writes UTF-16 with a byte-order mark: its NUL bytes ended in a
    ValueError traceback; so did an image named as a list by mistake."""
    from marsvision.runtime.inputs import expand_inputs

    lst = tmp_path / "list.txt"
    lst.write_bytes("a.jpg\r\nsol 2/b.jpg\r\n".encode("utf-16"))
    assert expand_inputs([f"@{lst}"]) == ["a.jpg", "sol 2/b.jpg"]
    image = tmp_path / "x.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01")
    with pytest.raises(MarsvisionError, match="is not a text file of paths .*line 1 holds a NUL"):
        expand_inputs([f"@{image}"])
    lst.write_text("  # an indented note\nimg.jpg\n")  # a comment however indented
    assert expand_inputs([f"@{lst}"]) == ["img.jpg"]
    # a list of no file (a nightly `find > list.txt` that failed) is an error, not "0 ok", exit 0,
    # where nothing else is given (beside other inputs it adds none, as an empty folder would)
    for text in ("", "\n \n# none tonight\n"):
        lst.write_text(text)
        with pytest.raises(MarsvisionError, match=r"^the list file .* names no file \(it is emp"):
            expand_inputs([f"@{lst}", f"@{lst}"])
        assert expand_inputs([f"@{lst}", str(image)]) == [str(image)]


def test_a_results_file_another_run_is_writing_is_refused(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """Two --resume runs on one --out (a job relaunched while the first still runs) each took
    the same rows as done and both wrote the rest: every row twice, exit 0. A run now holds a
    lock on the file while it writes, and a second one is refused, the file left as it was."""
    import fcntl

    out = tmp_path / "p.csv"
    r = _infer(images[0], "--engine", model, "--out", out)
    assert r.returncode == 0, r.stderr
    before = out.read_bytes()
    with open(out, "a") as held:  # as the first run holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        r = _infer(*images, "--engine", model, "--out", out, "--resume")
    assert r.returncode == 1
    assert b"is being written by another mars-infer" in r.stderr and b"Traceback" not in r.stderr
    assert out.read_bytes() == before
    r = _infer(*images, "--engine", model, "--out", out, "--resume")  # released: it goes on
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 1 + len(images)


def test_resume_refuses_other_top_k_and_the_other_format(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    assert _infer(images[0], "--engine", model, "--out", out).returncode == 0
    before = out.read_bytes()
    r = _infer(*images, "--engine", model, "--out", out, "--resume", "--top-k", "1")
    assert r.returncode == 1 and b"other classes or another --top-k" in r.stderr, r.stderr
    assert out.read_bytes() == before  # nothing appended
    r = _infer(*images, "--engine", model, "--out", out, "--resume", "--format", "csv")
    assert r.returncode == 1 and b"resume with --format jsonl" in r.stderr, r.stderr
    csv_out = tmp_path / "r.txt"  # CSV under a name that does not say so
    assert _infer(images[0], "--engine", model, "--out", csv_out).returncode == 0
    r = _infer(*images, "--engine", model, "--out", csv_out, "--resume", "--format", "jsonl")
    assert r.returncode == 1 and b"resume with --format csv" in r.stderr, r.stderr
    # the same options resume
    r = _infer(*images, "--engine", model, "--out", out, "--resume")
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 2
    assert all("probs" in json.loads(x) for x in out.read_text().splitlines())


def test_resume_refuses_the_other_kind_of_int8_sums(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """MARSVISION_EXACT_INT8 switched between a run and its --resume mixed rows of two
    arithmetics in one file (on a CPU without VNNI they give other probabilities), exit 0; the
    run record keeps the kind, and a resume of the other kind is refused."""
    env = {k: v for k, v in os.environ.items() if k != "MARSVISION_EXACT_INT8"}

    def infer(*args: str | os.PathLike[str], exact: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*MARS_INFER, *(os.fspath(a) for a in args), "--engine", model],
                              capture_output=True, cwd=tmp_path,
                              env={**env, "MARSVISION_EXACT_INT8": exact})  # fmt: skip

    out = tmp_path / "r.csv"
    assert infer(images[0], "--out", out, exact="1").returncode == 0
    assert json.loads((tmp_path / "r.csv.run.json").read_text())["int8_sums"] == "exact"
    before = out.read_bytes()
    r = infer(*images, "--out", out, "--resume", exact="0")
    assert r.returncode == 1, r.stderr
    assert r.stderr.decode().strip().splitlines()[-1] == (
        f"Error: {out} was written with exact INT8 sums, and this run's are fast (its run "
        f"record, {out}.run.json): resume it with MARSVISION_EXACT_INT8=1, or write to a new --out"
    )
    assert out.read_bytes() == before
    r = infer(*images, "--out", out, "--resume", exact="1")
    assert r.returncode == 0 and b"1 already in" in r.stderr, r.stderr


def test_out_of_file_descriptors_stops_the_run_without_error_rows(
    model: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `ulimit -n 8` every image got an error row "cannot read the file (Too many open
    files)", exit 3, and --resume kept them: the machine's limit is the run's error (one line,
    exit 1), and the images are left for --resume."""
    import errno

    from marsvision.runtime import preprocess
    from marsvision.runtime.classifier import Classifier

    def no_fds(path: Any) -> Any:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), os.fsdecode(path))

    monkeypatch.setattr(preprocess, "_open_file", no_fds)
    with Classifier(model, workers=2) as clf:
        with pytest.raises(MarsvisionError, match=r"\(Too many open files\): a limit of this"):
            clf.predict([str(p) for p in images])


def test_closed_or_full_standard_streams_and_a_deleted_working_folder(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """Started with stderr closed (`2>&-`), mars-infer died at its progress display with exit 1
    and no word, leaving an empty --out that a rerun refused; stderr on a full device made a
    finished run exit 1 at its summary; stdout closed with no --out, or a working folder
    deleted, were tracebacks."""
    whole = [*MARS_INFER, *map(os.fspath, images), "--engine", os.fspath(model)]

    def run(*args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*whole, *args], cwd=tmp_path, **kw)

    assert run("--out", "a.csv", preexec_fn=lambda: os.close(2)).returncode == 0
    with open("/dev/full", "w") as full:
        assert run("--out", "b.csv", stderr=full).returncode == 0
    for name in ("a.csv", "b.csv"):
        assert len((tmp_path / name).read_text().splitlines()) == 1 + len(images)
    r = run(preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE)
    assert r.returncode == 1 and r.stderr.decode().strip().splitlines() == [
        "Error: stdout is closed: pass --out FILE for the results"
    ]
    # with no --engine too: it sent the user to mars-export (no exports/ there)
    for n, command in enumerate([whole, [*MARS_INFER, os.fspath(images[0])]]):
        gone = tmp_path / f"gone{n}"
        gone.mkdir()
        r = subprocess.run([*command, "--out", os.fspath(tmp_path / "c.csv")], cwd=gone,
                           preexec_fn=functools.partial(os.rmdir, gone),
                           capture_output=True)  # fmt: skip
        assert r.returncode == 1 and r.stderr.decode().strip().splitlines() == [
            "Error: the working folder was deleted under this shell: cd to a folder that exists"
        ]
    assert not (tmp_path / "c.csv").exists()
    # a closed stderr is /dev/null again: the results file took its number, 2, where native
    # code writes its log lines
    probe = ("import os; from marsvision.runtime.cli import _standard_fds; _standard_fds(); "
             "print(os.readlink('/proc/self/fd/2'))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", probe], preexec_fn=lambda: os.close(2),
                       capture_output=False, stdout=subprocess.PIPE)  # fmt: skip
    assert r.stdout.decode().strip() == os.devnull


def test_the_commands_leave_no_onnxruntime_telemetry(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """onnxruntime 1.32 wrote a device id and an event queue under ~/.cache/Microsoft on every
    run (and warned on stderr where HOME could not be written): the commands turn it off."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    r = subprocess.run([*MARS_INFER, os.fspath(images[0]), "--engine", os.fspath(model)],
                       capture_output=True, env={**env, "HOME": os.fspath(home)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert list(home.iterdir()) == []


def test_an_unreadable_model_and_a_batch_that_does_not_fit_say_so(
    model: Path, images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model without read permission was "onnxruntime cannot load this model (... system
    error number 13); re-export it"; a batch buffer larger than the memory left (`ulimit -v`,
    `--batch-size 4096`) a MemoryError traceback."""
    from marsvision.runtime import backends, classifier
    from marsvision.runtime.classifier import Classifier

    with monkeypatch.context() as m:
        m.setattr(backends.os, "access", lambda p, mode: False)  # root reads any file
        with pytest.raises(MarsvisionError, match=r"cannot be read \(permission denied\)$"):
            Classifier(model)
    import numpy

    class NoRoom:  # the classifier's numpy, whose 4-d arrays (batch buffers) do not fit
        def __getattr__(self, name: str) -> Any:
            return getattr(numpy, name)

        @staticmethod
        def empty(shape: Any, dtype: Any = float) -> Any:
            if isinstance(shape, tuple) and len(shape) == 4:
                raise MemoryError
            return numpy.empty(shape, dtype)

    monkeypatch.setattr(classifier, "np", NoRoom())
    with Classifier(model, batch_size=4096) as clf:
        with pytest.raises(MarsvisionError, match=r"batch of 4096 images \(\d+ MiB\): use a"):
            clf.predict([str(p) for p in images])


def test_paths_under_a_locale_that_is_not_utf8(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """Under an ASCII locale (LC_ALL=C with PYTHONUTF8=0) Python spells a name's bytes with
    escapes: the CSV held them re-encoded, `--resume` in the same locale matched none of its
    rows (every image written again), and an @list's UTF-8 name led to no file. The CSV holds
    the file system's bytes in any locale, and resumes in any."""
    (tmp_path / "imgs").mkdir()
    name = "caf\u00e9.jpg"
    shutil.copy(images[0], tmp_path / "imgs" / name)
    shutil.copy(images[1], tmp_path / "imgs" / "plain.jpg")
    (tmp_path / "list.txt").write_text(f"imgs/{name}\n", encoding="utf-8")
    ascii_env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0"}
    ascii_env.pop("LANG", None)

    def infer(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> bytes:
        r = subprocess.run([*MARS_INFER, *(os.fspath(a) for a in args), "--engine", model],
                           capture_output=True, cwd=tmp_path, env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stderr

    infer("@list.txt", "--out", "a.csv", env=ascii_env)
    infer("imgs", "--out", "b.csv", env=ascii_env)
    for out in ("a.csv", "b.csv"):
        assert f"imgs/{name}".encode() in (tmp_path / out).read_bytes()
    assert b"2 already in" in infer("imgs", "--out", "b.csv", "--resume", env=ascii_env)
    assert b"2 already in" in infer("imgs", "--out", "b.csv", "--resume")  # the UTF-8 locale
    assert b"1 ok, 0 failed, 1 already in" in infer("imgs", "--out", "a.csv", "--resume")


def test_resume_refuses_another_version_of_the_library(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """A file begun under onnxruntime 1.19 and resumed under 1.32 mixed two versions' arithmetic
    (an int8-trt model's probabilities differ by up to 0.012), exit 0; the run record keeps the
    library and its version, and a resume under another is refused. A record from before it
    has none, and is taken as this run's."""
    import onnxruntime

    out = tmp_path / "r.csv"
    assert _infer(images[0], "--engine", model, "--out", out).returncode == 0
    record_file = tmp_path / "r.csv.run.json"
    record = json.loads(record_file.read_text())
    assert record["library"] == f"onnxruntime {onnxruntime.__version__}"
    # and, for provenance, what else made the rows (Pillow decodes and resizes every image)
    import PIL

    assert record["versions"]["pillow"] == PIL.__version__
    assert set(record["versions"]) == {"marsvision", "pillow", "numpy", "python"}
    record_file.write_text(json.dumps({**record, "library": "onnxruntime 1.19.2"}))
    before = out.read_bytes()
    r = _infer(*images, "--engine", model, "--out", out, "--resume")
    assert r.returncode == 1, r.stderr
    assert r.stderr.decode().strip().splitlines()[-1] == (
        f"Error: {out} was written with onnxruntime 1.19.2, and this run has onnxruntime "
        f"{onnxruntime.__version__} (its run record, {out}.run.json): other versions may give "
        "other probabilities; resume it with onnxruntime 1.19.2, or write to a new --out"
    )
    assert out.read_bytes() == before
    del record["library"]
    record_file.write_text(json.dumps(record))
    r = _infer(*images, "--engine", model, "--out", out, "--resume")
    assert r.returncode == 0 and b"1 already in" in r.stderr, r.stderr


def test_at_alone_is_a_file_and_a_piped_at_list_resumes_a_recursive_run(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """`@` alone names a file (a list's name needs a character after it); a file begun with -r
    and resumed with an @list read from a pipe reads the pipe once (read again for -r's check,
    it was empty: "names no file")."""
    shutil.copy(images[0], tmp_path / "@")
    r = _infer("@", "--engine", model, "--out", "at.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with (tmp_path / "at.csv").open() as f:
        # (written ./@: a spreadsheet takes a cell that starts with @ for a formula)
        assert [(row["path"], row["status"]) for row in csv.DictReader(f)] == [("./@", "ok")]
    (tmp_path / "d").mkdir()
    for p in images:
        shutil.copy(p, tmp_path / "d")
    assert _infer("d", "-r", "--engine", model, "--out", "r.csv", cwd=tmp_path).returncode == 0
    infer = " ".join(shlex.quote(c) for c in [*MARS_INFER, "--engine", str(model)])
    r = subprocess.run(["bash", "-c", f"{infer} @<(ls d/*) --out r.csv --resume"],
                       capture_output=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and f"{len(images)} already in".encode() in r.stderr, r.stderr


def test_resume_reads_relative_rows_from_the_folder_the_file_was_begun_in(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """Relative rows resumed from another folder matched nothing there, and every image was
    written twice: relative inputs from another folder are refused, absolute ones skip what the
    file has. Another --fast-decode (other pixels for a large JPEG) is refused too; its run
    record says how the file was begun."""
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "imgs").mkdir(parents=True)
    b.mkdir()
    for p in images:
        shutil.copy(p, a / "imgs")
    names = [p.name for p in images]

    def infer(*args: str | os.PathLike[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
        return _infer(*args, "--engine", model, cwd=cwd)

    assert infer(f"imgs/{names[0]}", "--out", "r.csv", cwd=a).returncode == 0
    record = json.loads((a / "r.csv.run.json").read_text())
    assert os.path.realpath(record["cwd"]) == os.path.realpath(a)
    assert record["fast_decode"] is False and record["inputs"] == 1
    before = (a / "r.csv").read_bytes()
    r = infer(*(f"../a/imgs/{n}" for n in names), "--out", "../a/r.csv", "--resume", cwd=b)
    assert r.returncode == 1 and b"was begun in" in r.stderr, r.stderr
    assert (a / "r.csv").read_bytes() == before
    r = infer(*(a / "imgs" / n for n in names), "--out", a / "r.csv", "--resume", cwd=b)
    assert r.returncode == 0 and b"1 already in" in r.stderr, r.stderr
    assert len((a / "r.csv").read_text().splitlines()) == 1 + len(names)
    r = infer(*(f"imgs/{n}" for n in names), "--out", "r.csv", "--resume", "--fast-decode", cwd=a)
    assert r.returncode == 1 and b"without --fast-decode" in r.stderr, r.stderr
    # without its record (a file from before run records, or copied without it), relative
    # rows were taken as from here, where they lead nowhere: every image written again, exit 0
    shutil.copy(a / "r.csv", b / "copy.csv")
    before = (b / "copy.csv").read_bytes()
    r = infer(*(f"../a/imgs/{n}" for n in names), "--out", "copy.csv", "--resume", cwd=b)
    assert r.returncode == 1 and b"has no run record" in r.stderr, r.stderr
    assert (b / "copy.csv").read_bytes() == before
    shutil.copy(a / "r.csv", a / "copy.csv")  # from the folder it was begun in: resumed
    r = infer(*(f"imgs/{n}" for n in names), "--out", "copy.csv", "--resume", cwd=a)
    assert r.returncode == 0 and f"{len(names)} already in".encode() in r.stderr, r.stderr
    # so it is with some of its images gone since (not all), and with rows for images never
    # read alone (error rows: no file there to find)
    assert infer(*(f"imgs/{n}" for n in names), "--out", "part.csv", cwd=a).returncode == 0
    (a / "part.csv.run.json").unlink()
    moved = (a / "imgs" / names[-1]).rename(tmp_path / names[-1])
    r = infer(f"imgs/{names[0]}", "--out", "part.csv", "--resume", cwd=a)
    assert r.returncode == 0 and b"1 already in" in r.stderr, r.stderr
    moved.rename(a / "imgs" / names[-1])
    assert infer("imgs/not-there.jpg", "--out", "err.csv", cwd=a).returncode == 3
    (a / "err.csv.run.json").unlink()
    r = infer("imgs/not-there.jpg", f"imgs/{names[0]}", "--out", "err.csv", "--resume", cwd=a)
    assert r.returncode == 3 and b"1 already in" in r.stderr, r.stderr
    assert len((a / "err.csv").read_text().splitlines()) == 3
    # a file with no row yet (a CSV run killed in its first batch: the header alone) holds
    # nothing to mix with, and gets this run's record
    from marsvision.runtime.results import csv_header

    (a / "e.csv").write_text(",".join(csv_header(["Surface", "Rover"], None)) + "\n")
    (a / "e.csv.run.json").write_text(json.dumps({"cwd": str(b), "fast_decode": True}))
    assert infer(f"imgs/{names[0]}", "--out", "e.csv", "--resume", cwd=a).returncode == 0
    assert json.loads((a / "e.csv.run.json").read_text())["fast_decode"] is False
    # the folder moved: resumed from where it is now, its relative rows are still its own; from
    # elsewhere, their folder is gone (absolute inputs matched none of them: all written twice)
    c = a.rename(tmp_path / "c")
    r = infer(*(c / "imgs" / n for n in names), "--out", c / "e.csv", "--resume", cwd=b)
    assert r.returncode == 1 and b"that folder is gone" in r.stderr, r.stderr
    r = infer(*(f"imgs/{n}" for n in names), "--out", "e.csv", "--resume", cwd=c)
    assert r.returncode == 0 and b"1 already in" in r.stderr, r.stderr
    # absolute rows lead where they did wherever the run began: its folder may go
    gone = tmp_path / "scratch"
    gone.mkdir()
    assert infer(c / "imgs" / names[0], "--out", b / "g.csv", cwd=gone).returncode == 0
    gone.rmdir()
    r = infer(*(c / "imgs" / n for n in names), "--out", "g.csv", "--resume", cwd=b)
    assert r.returncode == 0 and b"1 already in" in r.stderr, r.stderr
    # a run stopped before its first row removes the --out it made, not a link's target
    (b / "link.csv").symlink_to("target.csv")
    (b / "link.csv.run.json").mkdir()  # the record cannot be written
    r = infer(c / "imgs" / names[0], "--out", "link.csv", "--resume", cwd=b)
    assert r.returncode == 1 and b"choose another --out" in r.stderr, r.stderr
    assert (b / "link.csv").is_symlink()


def test_resume_of_a_recursive_run_needs_recursive(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """A run begun with --recursive and resumed without it passed over the images in subfolders
    it had no row for yet, and said the file was done. Refused now, but only then: a resume
    that names files alone, or finds nothing new in subfolders, goes on; a resume that adds
    --recursive makes the file one begun with it."""
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    shutil.copy(images[0], tmp_path / "imgs" / "top.JPG")
    shutil.copy(images[1], tmp_path / "imgs" / "sub" / "deep.JPG")
    shutil.copy(images[1], tmp_path / "new.JPG")
    imgs = tmp_path / "imgs"

    def cut_deep_row(out: Path) -> bytes:  # as if killed before the subfolder's image
        kept = [ln for ln in out.read_text().splitlines(keepends=True) if "deep.JPG" not in ln]
        out.write_text("".join(kept))
        return out.read_bytes()

    out = tmp_path / "r.csv"
    assert _infer(imgs, "-r", "--out", out, "--engine", model).returncode == 0
    assert json.loads((tmp_path / "r.csv.run.json").read_text())["recursive"] is True
    r = _infer(imgs, "--out", out, "--resume", "--engine", model)  # all there: nothing missed
    assert r.returncode == 0 and b"1 already in" in r.stderr, r.stderr
    before = cut_deep_row(out)
    r = _infer(imgs, "--out", out, "--resume", "--engine", model)
    assert r.returncode == 1, r.stderr
    assert b"passes over 1 image in subfolders" in r.stderr, r.stderr
    assert b"resume it with --recursive" in r.stderr and out.read_bytes() == before
    r = _infer(tmp_path / "new.JPG", "--out", out, "--resume", "--engine", model)  # files alone
    assert r.returncode == 0 and b"1 ok, 0 failed" in r.stderr, r.stderr
    assert b"; 1 image in " in r.stderr, r.stderr  # not "1 images"
    r = _infer(imgs, "-r", "--out", out, "--resume", "--engine", model)
    assert r.returncode == 0 and b"1 ok" in r.stderr and b"1 already in" in r.stderr, r.stderr
    # begun without it, widened by a resume with it: a later resume without it is refused too
    out = tmp_path / "top.csv"
    assert _infer(imgs, "--out", out, "--engine", model).returncode == 0
    r = _infer(imgs, "-r", "--out", out, "--resume", "--engine", model)
    assert r.returncode == 0 and b"1 already in" in r.stderr, r.stderr
    assert json.loads((tmp_path / "top.csv.run.json").read_text())["recursive"] is True
    cut_deep_row(out)
    r = _infer(imgs, "--out", out, "--resume", "--engine", model)
    assert r.returncode == 1 and b"passes over 1 image in" in r.stderr, r.stderr


def test_a_stop_inside_the_onnxruntime_import_stays_a_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """onnxruntime's C module wraps a Ctrl-C or SIGTERM in its setup in ImportError
    ("initialization failed"): mars-infer said to reinstall onnxruntime (a review's probe: 1 of
    25 SIGTERMs early in a run); the stop may be its cause (`raise ... from`) or, as C code that
    meets a pending one raises its own error while it is handled, its context."""
    import builtins

    from marsvision.runtime.backends.onnxruntime import ort_module
    from marsvision.runtime.errors import Stopped, stop_inside

    def wrapped(stop: BaseException, cause: bool) -> ImportError:
        try:
            try:
                raise stop
            except BaseException:
                if cause:
                    raise ImportError("initialization failed") from stop
                raise ImportError("initialization failed")  # noqa: B904 - as C code does
        except ImportError as e:
            return e

    assert stop_inside(ImportError("no module")) is None
    real = builtins.__import__
    for stop, cause in itertools.product((KeyboardInterrupt(), Stopped(15)), (True, False)):
        assert stop_inside(wrapped(stop, cause)) is stop

        def failing(name: str, *args: Any, s: BaseException = stop, c: bool = cause,
                    **kw: Any) -> Any:  # fmt: skip
            if name == "onnxruntime":
                raise wrapped(s, c)
            return real(name, *args, **kw)

        monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
        monkeypatch.setattr(builtins, "__import__", failing)
        with pytest.raises(type(stop)):
            ort_module()
        monkeypatch.undo()


def test_unreadable_results_file_is_a_one_line_error(tmp_path: Path) -> None:
    from marsvision.runtime.results import Provenance, csv_header
    from marsvision.runtime.resume import read_done

    with pytest.raises(MarsvisionError, match="cannot resume the results file"):
        read_done(str(tmp_path), fmt="csv", header=csv_header(["a", "b"], None),
                  provenance=Provenance("sha", "fp32", "onnxruntime-cpu"))  # fmt: skip
    # JSONL paths no file name can have (a lone surrogate, a number): tracebacks
    for path in ("\ud800.jpg", 7):
        (tmp_path / "r.jsonl").write_text(json.dumps({"path": path, "status": "ok"}) + "\n")
        with pytest.raises(MarsvisionError, match="line 1 is not a result row"):
            read_done(str(tmp_path / "r.jsonl"), fmt="jsonl", header=[],
                      provenance=Provenance("sha", "fp32", "onnxruntime-cpu"))  # fmt: skip


def test_output_folder_with_too_long_a_name_is_a_one_line_error(tmp_path: Path) -> None:
    from marsvision.runtime.files import check_writable_folder

    # the shared check of mars-train/mars-export --out and --download --data: the OS's refusal
    # (ENAMETOOLONG from stat) must not escape as a traceback
    too_long = tmp_path / ("x" * 300) / "run"
    refused = r"^--out .*: cannot write into .*; pass another --out$"
    with pytest.raises(MarsvisionError, match=refused):
        check_writable_folder(too_long, "--out")
    assert list(tmp_path.iterdir()) == []


def test_threads_follow_the_cpu_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a box limited to one core (taskset, a container) the runtime's threads and the
    benchmarks' record say one, not the machine's core count."""
    from marsvision.benchmarks.conditions import cpu_info
    from marsvision.runtime.backends.onnxruntime import session_options
    from marsvision.runtime.classifier import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert session_options().intra_op_num_threads == 1
    assert default_workers() == 1
    assert cpu_info()["usable_cores"] == 1


def test_parity_reference_is_the_exported_checkpoint(
    tiny_checkpoint: Path, tiny_exports: Path, tmp_path: Path
) -> None:
    """The manifest names its source checkpoint by absolute path (so mars-bench finds it from
    any folder), and a checkpoint changed since the export is refused, not compared against."""
    from marsvision.benchmarks.cli import _checkpoint

    manifest = json.loads((tiny_exports / "manifest.json").read_text())
    assert Path(manifest["source_checkpoint"]).is_absolute()
    assert _checkpoint(None, tiny_exports) == tiny_checkpoint.resolve()
    arts = tmp_path / "arts"
    shutil.copytree(tiny_exports, arts)  # the same artifacts, their manifest edited below
    moved = tmp_path / "ckpt.pt"
    moved.write_bytes(tiny_checkpoint.read_bytes() + b"changed")
    (arts / "manifest.json").write_text(json.dumps({**manifest, "source_checkpoint": str(moved)}))
    # its advice works: mars-export refuses the old --out for the changed checkpoint
    with pytest.raises(MarsvisionError, match="has changed since .* export it again into a new "):
        _checkpoint(None, arts)
    assert _checkpoint(tiny_checkpoint, arts) == tiny_checkpoint  # --checkpoint wins
    moved.unlink()  # moved away: named, not "names none"
    with pytest.raises(MarsvisionError, match=f"json names {moved}, which is no file here"):
        _checkpoint(None, arts)


def test_a_quoted_message_is_cut_at_a_word() -> None:
    """A library's message quoted in ours was cut mid-word ("... the shape in current model is
    torch.)"): at a word, with " ..."; its first line only."""
    from marsvision.runtime.errors import clipped

    said = "size mismatch for fc.weight: the shape in current model is torch.Size([2, 2048])."
    assert clipped(said, 200) == said
    assert clipped(said, 70) == "size mismatch for fc.weight: the shape in current model is ..."
    assert clipped("first line\nsecond", 100) == "first line"
    assert clipped("", 10) == ""


def test_probabilities_are_written_with_six_decimals() -> None:
    """README: "Probabilities are written with 6 decimals", in both formats, all classes or the
    top k; an error row's cells are empty (CSV) or null (JSONL)."""
    from marsvision.runtime.classifier import Prediction
    from marsvision.runtime.results import Provenance, ResultWriter

    rows = [
        Prediction("a.jpg", "ok", "rover", (0.12345678912, 0.87654321088)),
        Prediction("b.jpg", "error", error="cannot decode"),
    ]
    written = {}
    for fmt, top_k in itertools.product(("csv", "jsonl"), (None, 1)):
        buf = io.StringIO()
        ResultWriter(buf, fmt=fmt, class_names=["surface", "rover"], top_k=top_k,
                     provenance=Provenance("sha", "int8", "onnxruntime-cpu"),
                     write_header=True).write(rows)  # fmt: skip
        written[fmt, top_k] = buf.getvalue().splitlines()
    assert written["csv", None][1].split(",")[3:5] == ["0.123457", "0.876543"]
    assert written["csv", None][2].split(",")[3:5] == ["", ""]
    assert written["csv", 1][1].split(",")[3:5] == ["rover", "0.876543"]
    assert json.loads(written["jsonl", None][0])["probs"] == {
        "surface": 0.123457,
        "rover": 0.876543,
    }
    assert json.loads(written["jsonl", None][1])["probs"] is None
    assert json.loads(written["jsonl", 1][0])["top_k"] == [["rover", 0.876543]]


def testwhole_csv_records() -> None:
    from marsvision.runtime.results import whole_csv_records

    whole = b'path,status\n"a\nb.jpg",ok\n"say ""hi"".jpg",ok\n'
    assert whole_csv_records(whole) == len(whole)
    assert whole_csv_records(whole + b'"c\nd.jp') == len(whole)  # cut inside a quoted path
    assert whole_csv_records(whole + b"e.jpg,o") == len(whole)
    assert whole_csv_records(b"") == 0


def test_csv_resume_after_a_cut_inside_a_quoted_path(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """A kill that cuts the row of a file whose name holds a newline: --resume drops that row
    (not just its last physical line) and writes it again."""
    odd = tmp_path / 'new\nline "q".jpg'
    shutil.copy(images[0], odd)
    out = tmp_path / "r.csv"
    assert _infer(odd, images[1], "--engine", model, "--out", out).returncode == 0
    whole = out.read_bytes()
    cut = whole.index(b"new\nline") + len(b"new\nli")
    out.write_bytes(whole[:cut])  # as a kill would leave it: header, half of the odd row
    r = _infer(odd, images[1], "--engine", model, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == whole


_PROV = ("sha", "fp32", "onnxruntime-cpu")


@pytest.mark.parametrize(
    ("fmt", "content"),
    [
        ("csv", b"path,stat"),
        ("csv", b"pa"),
        ("jsonl", b'{"pa'),
        ("jsonl", b'{"path": "x.jpg", "st'),
    ],
)
def test_resume_empties_a_first_line_cut_by_a_kill(
    tmp_path: Path, fmt: str, content: bytes
) -> None:
    """A kill while the header (or the first JSONL row) was written leaves no whole line: that
    file begins again; a file of no whole line that is not such a start is refused (above)."""
    from marsvision.runtime.results import Provenance, csv_header
    from marsvision.runtime.resume import read_done

    out = tmp_path / f"r.{fmt}"
    out.write_bytes(content)
    assert read_done(str(out), fmt=fmt, header=csv_header(["a", "b"], None),
                     provenance=Provenance(*_PROV)) == {}  # fmt: skip
    assert out.read_bytes() == b""


@pytest.mark.parametrize(
    ("fmt", "content", "refusal"),
    [
        ("csv", b'name,size\nscreen 5" wide,12\nfoo,1\nbar,2', "is not a mars-infer results"),
        ("csv", b"path,status,label,prob_c,prob_d\nx,ok,c,1,0\n", "do not match this model"),
        ("csv", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "is not a mars-infer results file"),
        ("csv", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\nmore", "is not a mars-infer results"),
        ("csv", b"keep these notes, no newline", "is not a mars-infer results file"),
        ("jsonl", b'{"notes": "mine"}', "is not a mars-infer results file"),
        ("jsonl", b'{"path": "/data/sol0100", "batch": 8}', "line 1 is not a result row"),
        ("jsonl", b'{"a": 1}\n{"b": 2}', "line 1 is not a result row"),
        ("jsonl", b'{"path": "x", "status": "ok", "probs": 0.5}\n{"pa', "line 1 is not a result"),
    ],
)
def test_resume_leaves_a_refused_file_as_it_was(
    tmp_path: Path, fmt: str, content: bytes, refusal: str
) -> None:
    """--resume on a file that is not this run's results (the wrong --out) is refused before
    anything is cut from it: its unfinished last line is not a kill's row to drop."""
    from marsvision.runtime.results import Provenance, csv_header
    from marsvision.runtime.resume import read_done

    out = tmp_path / f"labels.{fmt}"
    out.write_bytes(content)
    with pytest.raises(MarsvisionError, match=refusal):
        read_done(str(out), fmt=fmt, header=csv_header(["a", "b"], None),
                  provenance=Provenance(*_PROV))  # fmt: skip
    assert out.read_bytes() == content


def test_resume_empties_a_first_row_of_this_run_cut_just_before_its_line_break(
    tmp_path: Path,
) -> None:
    """A JSONL file of one whole JSON object and no line break is a cut first row only when it
    is this run's row (another program's one-line config.json was emptied): it begins again."""
    from marsvision.runtime.classifier import Prediction
    from marsvision.runtime.results import Provenance, ResultWriter, csv_header
    from marsvision.runtime.resume import read_done

    out = tmp_path / "r.jsonl"
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = ResultWriter(f, fmt="jsonl", class_names=["a", "b"], top_k=None,
                              provenance=Provenance(*_PROV), write_header=True)  # fmt: skip
        writer.write([Prediction("a.jpg", "ok", "a", (0.75, 0.25))])
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    header = csv_header(["a", "b"], None)
    assert read_done(str(out), fmt="jsonl", header=header, provenance=Provenance(*_PROV)) == {}
    assert out.read_bytes() == b""


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("field", ["model_sha256", "backend", "tta"])
def test_resume_refuses_rows_of_another_model_backend_or_tta(
    tmp_path: Path, fmt: str, field: str
) -> None:
    """Rows of another model file, --tta or backend (a run begun on onnxruntime-cuda resumed
    with --device cpu after a GPU fault: it was continued, two backends' outputs in one file)
    are not continued."""
    import dataclasses

    from marsvision.runtime.classifier import Prediction
    from marsvision.runtime.results import Provenance, ResultWriter, csv_header
    from marsvision.runtime.resume import read_done

    prov = Provenance(*_PROV)
    other = dataclasses.replace(prov, **{field: "flip" if field == "tta" else "x" * 16})
    out = tmp_path / f"r.{fmt}"
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = ResultWriter(f, fmt=fmt, class_names=["a", "b"], top_k=None,
                              provenance=other, write_header=True)  # fmt: skip
        writer.write([Prediction("a.jpg", "ok", "a", (0.75, 0.25))])
    header = csv_header(["a", "b"], None)
    with pytest.raises(MarsvisionError, match=f"has {field} .*resume with the same model, "):
        read_done(str(out), fmt=fmt, header=header, provenance=prov)
    assert read_done(str(out), fmt=fmt, header=header, provenance=other) == {"a.jpg": "ok"}


def test_csv_rows_round_trip_carriage_returns_and_long_fields(tmp_path: Path) -> None:
    """A file name with a carriage return or a newline stays one field of one row (every CSV
    reader would end the row there if it were not quoted), and a path longer than the csv
    module's default field limit (an error row for a bad line of a list file) still resumes."""
    from marsvision.runtime.classifier import Prediction
    from marsvision.runtime.results import Provenance, ResultWriter, csv_header
    from marsvision.runtime.resume import read_done

    paths = ["a\rb.jpg", "c.jpg", "x" * 200_000, "d\ne.jpg"]
    out = tmp_path / "r.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = ResultWriter(f, fmt="csv", class_names=["a", "b"], top_k=None,
                              provenance=Provenance(*_PROV), write_header=True)  # fmt: skip
        writer.write([Prediction(p, "ok", "a", (0.75, 0.25)) for p in paths])
    with open(out, newline="", encoding="utf-8") as f:
        csv.field_size_limit(1 << 20)
        assert [row[0] for row in csv.reader(f)] == ["path", *paths]
    csv.field_size_limit(131072)  # the default, as a fresh process has it
    done = read_done(str(out), fmt="csv", header=csv_header(["a", "b"], None),
                     provenance=Provenance(*_PROV))  # fmt: skip
    assert done == dict.fromkeys(paths, "ok")


def test_file_names_that_start_as_a_formula_are_written_as_dot_slash(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """A file name from a pattern or a list such as `=HYPERLINK(...).jpg` was the CSV's bare
    path cell, a formula a spreadsheet runs; it is written `./=...` (the same file), and
    --resume takes it as the same input. A folder's files and other paths are unchanged."""
    names = ["+1.jpg", "-2.jpg", "=HYPERLINK(A1).jpg", "@3.jpg", "b.jpg"]
    for name in names:
        shutil.copy(images[0], tmp_path / name)
    (tmp_path / "d").mkdir()
    shutil.copy(images[1], tmp_path / "d" / "=4.jpg")
    out = tmp_path / "r.csv"
    r = _infer("*.jpg", "d", "--engine", model, "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    paths = [row[0] for row in rows[1:]]
    assert paths == [*(f"./{n}" for n in names[:4]), "b.jpg", "d/=4.jpg"]
    assert {row[1] for row in rows[1:]} == {"ok"}
    r = _infer("*.jpg", "d", "--engine", model, "--out", out, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert b"0 ok, 0 failed, 6 already in" in r.stderr
    assert len(out.read_text().splitlines()) == 7


def test_results_that_cannot_be_written_are_a_one_line_error(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """A full disk or a file size limit while writing rows is one line and exit 1 (no traceback,
    nor a second one from closing the file); --resume then completes the file."""

    with open("/dev/full", "wb") as full:
        r = subprocess.run([*MARS_INFER, *images, "--engine", model], stdout=full,
                           capture_output=False, stderr=subprocess.PIPE)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        b"Error: cannot write the results to stdout (No space left on device)"
    ]
    # nor "rerun with --resume" to a device, where --resume is refused
    r = subprocess.run([*MARS_INFER, *images, "--engine", model, "--out", "/dev/full"],
                       capture_output=True)  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        b"Error: cannot write the results to /dev/full (No space left on device)"
    ]

    many = [tmp_path / f"{i}{p.name}" for i in range(4) for p in images]  # 8 rows: 1.4 kB
    for p in many:
        shutil.copy(images[0], p)
    out = tmp_path / "r.csv"
    args: list[str | os.PathLike[str]] = [*MARS_INFER, *many, "--engine", model, "--out", out,
                                          "--batch-size", "1"]  # fmt: skip
    # the run record (about 600 bytes) fits, and the header and a few rows
    r = subprocess.run(args, capture_output=True, preexec_fn=files_up_to(1000))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"Error: cannot write the results to {out} (File too large); make room and rerun with "
        "--resume".encode()
    ]
    assert 0 < out.stat().st_size <= 1000
    r = _infer(*many, "--engine", model, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert [line.split(",")[0] for line in out.read_text().splitlines()[1:]] == list(map(str, many))
    # nor does the run record, and the run leaves no empty --out that a rerun would refuse
    out.unlink()
    r = subprocess.run(args, capture_output=True, preexec_fn=files_up_to(200))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"Error: cannot write the run record {out}.run.json (File too large); make room, or "
        "choose another --out".encode()
    ]
    assert not out.exists()


def test_an_out_made_by_another_run_meanwhile_says_exists(tmp_path: Path) -> None:
    """Two new runs on one --out started together: the second's open found the first's file
    after its own check, and said "cannot write the results file ... (File exists)"."""
    from marsvision.runtime.errors import MarsvisionError
    from marsvision.runtime.resume import open_output

    out = tmp_path / "r.csv"
    out.write_text("path\n")
    with pytest.raises(MarsvisionError) as e:
        open_output(str(out), append=False)
    assert e.value.message == f"{out} exists: pass --resume to continue it, or choose another --out"


def test_a_device_or_pipe_out_is_written_as_it_is(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """-o /dev/null was refused ("exists: pass --resume"); with --resume it was read back:
    /dev/zero until memory ran out, a pipe it writes itself forever. A FIFO a script reads gets
    the header and rows, unlocked (two runs may share /dev/null) and with no run record."""
    import threading

    r = _infer(*images, "--engine", model, "-o", "/dev/null")
    assert r.returncode == 0, r.stderr
    r = _infer(*images, "--engine", model, "-o", "/dev/zero", "--resume")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        b"Error: /dev/zero is a device or pipe: --resume reads the rows of a results file back; "
        b"leave --resume out"
    ]
    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    r = _infer(*images, "--engine", model, "-o", fifo)
    reader.join(30)
    assert r.returncode == 0, r.stderr
    rows = got[0].decode().splitlines()
    assert rows[0].startswith("path,status,") and [x.split(",")[0] for x in rows[1:]] == list(
        map(str, images)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]  # no run record


def test_out_dev_stdout_is_stdout_even_redirected_to_a_file(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """`-o /dev/stdout > f.csv`: /dev/stdout then names a regular file that exists, so the run
    was refused ("exists: pass --resume"), and with --resume wrote /dev/stdout.run.json. It is
    stdout, whatever stdout is."""
    redirected = tmp_path / "f.csv"
    with open(redirected, "wb") as f:
        r = subprocess.run([*MARS_INFER, *map(str, images), "--engine", str(model), "-o",
                            "/dev/stdout"], stdout=f, stderr=subprocess.PIPE)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = redirected.read_text().splitlines()
    assert rows[0].startswith("path,status,") and [x.split(",")[0] for x in rows[1:]] == list(
        map(str, images)
    )
    r = _infer(*images, "--engine", model, "-o", "/dev/stdout", "--resume")
    assert r.returncode == 2 and b"--resume needs --out (the file to continue, not stdout)" in (
        r.stderr
    )
    assert not os.path.exists("/dev/stdout.run.json")


def test_inputs_through_symlinked_folders(tmp_path: Path) -> None:
    """`link/../a.jpg` is the a.jpg beside the link's target, another file than the a.jpg beside
    the link: both are inputs (the text-only key merged them, and one got no row); a symlinked
    folder's spelling of a file is that file; two symlinks to one file are two inputs."""
    from marsvision.runtime.inputs import expand_inputs

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "a.jpg").write_bytes(b"1")
    (tmp_path / "real" / "a.jpg").write_bytes(b"2")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    (tmp_path / "alias.jpg").symlink_to(tmp_path / "a.jpg")
    t = str(tmp_path)
    args = [f"{t}/a.jpg", f"{t}/link/../a.jpg", f"{t}/real/a.jpg", f"{t}/alias.jpg"]
    assert expand_inputs(args) == [f"{t}/a.jpg", f"{t}/link/../a.jpg", f"{t}/alias.jpg"]
    # a folder with a trailing slash is the same folder (an empty one: an input of its own)
    (tmp_path / "empty").mkdir()
    assert expand_inputs([f"{t}/empty", f"{t}/empty/", f"{t}/empty//"]) == [f"{t}/empty"]


def test_one_file_spelled_two_ways_is_one_input(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """`d/a.jpg`, `d/./a.jpg` and `d//a.jpg` are one input, in one run and across --resume
    (whose rows were written under another spelling); error rows it skips are counted, and
    `--out -` is stdout."""
    d, name = images[0].parent, images[0].name
    other = [f"{d}/./{name}", f"{d}//{images[1].name}"]
    out = tmp_path / "r.csv"
    assert _infer(images[0], *other, "--engine", model, "--out", out).returncode == 0
    rows = out.read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(images[0]), other[1]]
    missing = tmp_path / "missing.jpg"
    r = _infer(*other, images[1], missing, "--engine", model, "--out", out, "--resume")
    now = out.read_text().splitlines()[1:]
    assert r.returncode == 3 and now[:2] == rows and len(now) == 3, r.stderr
    assert now[2].startswith(f"{missing},error,")
    r = _infer(*images, missing, "--engine", model, "--out", out, "--resume")
    assert r.returncode == 3 and len(out.read_text().splitlines()) == 4, r.stderr
    assert b"3 already in" in r.stderr and b"(skipped; 1 of them with status error: " in r.stderr
    r = _infer(images[0], "--engine", model, "--out", "-")
    assert r.returncode == 0 and r.stdout.startswith(b"path,status,"), r.stderr
    assert not Path("-").exists()


def test_folder_refused_between_check_and_creation_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make_folder (mars-train, mars-export, ship, sweep): the path passes the check, then
    something takes it (here a file of that name) before the folder is made."""
    from marsvision.runtime import files

    target = tmp_path / "run"
    real_check = files.check_writable_folder

    def check_then_race(path: Path, option: str) -> None:
        real_check(path, option)
        target.write_text("not a folder")

    monkeypatch.setattr(files, "check_writable_folder", check_then_race)
    refused = r"^--out .*run: cannot create it \(.*\); pass another --out$"
    with pytest.raises(MarsvisionError, match=refused):
        files.make_folder(target, "--out")
    assert target.is_file()
    assert files.make_folder(tmp_path / "a" / "b", "--out").is_dir()


@pytest.mark.parametrize("command", ["speed", "parity", "score"])
def test_bench_refuses_an_unwritable_out_before_it_runs(tmp_path: Path, command: str) -> None:
    """mars-bench writes its JSON at the end of a run of minutes: a bad --out is refused first,
    whatever else is wrong (here the artifacts and predictions do not exist either)."""
    from click.testing import CliRunner

    from marsvision.benchmarks.cli import main as bench_main

    taken = tmp_path / "results"
    taken.write_text("a file")
    missing = tmp_path / "nothing"
    by_command: dict[str, list[str | Path]] = {
        "speed": ["--artifacts", missing], "parity": ["--artifacts", missing], "score": [missing]
    }  # fmt: skip
    args = by_command[command]
    result = CliRunner().invoke(bench_main, [command, *map(str, args), "--out", str(taken)])
    assert result.exit_code == 1, result.output
    assert f"--out {taken} is a file, not a folder" in result.output
    assert "Traceback" not in result.output


def test_ship_and_sweep_refuse_an_unwritable_out_before_the_work(tmp_path: Path) -> None:
    from marsvision.train.ship import ship_run
    from marsvision.train.sweep import parse_settings, run_sweep

    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(MarsvisionError, match=r"^--models .* is a file, not a folder$"):
        ship_run(tmp_path / "no-run", models_dir=taken, data_dir=tmp_path)
    with pytest.raises(MarsvisionError, match=r"^--out .* is a file, not a folder$"):
        run_sweep(data_dir=tmp_path, task="binary", names=["default"], settings=parse_settings(()),
                  budget_s=60.0, runs_dir=tmp_path / "runs", out_dir=taken, workers=1)  # fmt: skip
    assert not (tmp_path / "runs").exists()


def test_cpu_flags_and_which_cpus_sum_int8_in_saturating_16_bit(tmp_path: Path) -> None:
    from marsvision.runtime.host import cpu_flags, int8_sums_saturate

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_1 avx2 f16c\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")  # fmt: skip
    assert cpu_flags(info) == {"fpu", "sse4_1", "avx2", "f16c"}  # the first CPU's
    assert cpu_flags(tmp_path / "none") == frozenset()
    zen3 = cpu_flags(info)
    assert int8_sums_saturate(zen3, "x86_64")  # AVX2 only: PMADDUBSW saturates
    for wide in ("avx512_vnni", "avx_vnni", "amx_int8"):  # 32-bit sums
        assert not int8_sums_saturate(zen3 | {wide}, "x86_64")
    assert int8_sums_saturate(frozenset(), "AMD64")  # unknown x86: exact rather than fast
    assert not int8_sums_saturate(frozenset(), "aarch64")


def test_sessions_ask_for_exact_int8_where_the_cpu_would_saturate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mars-infer, mars-bench and mars-export's own check all open ONNX Runtime through
    session_options: on a CPU without VNNI it turns on the exact u8u8 INT8 kernels (the shipped
    model's INT8 agreed 98.90% with PyTorch on val there without, 99.51% with)."""
    from marsvision.runtime.backends import onnxruntime as backend

    def exact(so: Any) -> bool:
        try:
            return bool(so.get_session_config_entry(backend.EXACT_INT8_KEY) == "1")
        except RuntimeError:  # onnxruntime: no such entry
            return False

    assert exact(backend.session_options(exact_int8=True))
    assert not exact(backend.session_options(exact_int8=False))
    monkeypatch.delenv(backend.EXACT_INT8_ENV, raising=False)
    monkeypatch.setattr(backend, "int8_sums_saturate", lambda: True)
    assert exact(backend.session_options())
    monkeypatch.setenv(backend.EXACT_INT8_ENV, "0")  # the fast path, asked for
    assert not exact(backend.session_options())
    monkeypatch.setattr(backend, "int8_sums_saturate", lambda: False)
    monkeypatch.setenv(backend.EXACT_INT8_ENV, "auto")
    assert not exact(backend.session_options())
    monkeypatch.setenv(backend.EXACT_INT8_ENV, "1")
    assert exact(backend.session_options())
    monkeypatch.setenv(backend.EXACT_INT8_ENV, "yes")
    with pytest.raises(MarsvisionError, match=r"MARSVISION_EXACT_INT8='yes': use 1"):
        backend.session_options()


@pytest.mark.parametrize("exact", ["1", "0"])
def test_infer_says_when_int8_runs_in_exact_sums(
    model: Path, images: list[Path], exact: str
) -> None:
    """The summary line names the slower exact INT8 kernels where they run (by default on a CPU
    without VNNI; here forced both ways)."""
    env = {**os.environ, "MARSVISION_EXACT_INT8": exact}
    args = [*map(os.fspath, images), "--engine", os.fspath(model)]
    r = subprocess.run([*MARS_INFER, *args], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr.decode()
    summary = r.stderr.decode().strip().splitlines()[-1]
    assert ("(onnxruntime-cpu, int8-cpu, exact sums, batch" in summary) == (exact == "1"), summary
    assert len(r.stdout.decode().strip().splitlines()) == 1 + len(images)


def test_infer_names_the_int8_flavour(tiny_models: dict[str, Path], images: list[Path]) -> None:
    """int8-cpu and int8-trt were both "int8" in the summary: only the rows' sha256 said which
    file made them. (Exact sums off: on a CPU without VNNI they are on by default, and named.)"""
    env = {**os.environ, "MARSVISION_EXACT_INT8": "0"}
    args = [os.fspath(images[0]), "--engine", os.fspath(tiny_models["int8-trt"])]
    r = subprocess.run([*MARS_INFER, *args], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr.decode()
    assert "(onnxruntime-cpu, int8-trt, batch 8; " in r.stderr.decode().strip().splitlines()[-1]


def test_a_second_signal_waits_for_the_cleanups() -> None:
    """`interruptible`: Ctrl-C pressed again (or SIGTERM after it) cut the cleanups of the first
    (a half-written checkpoint or staging folder stayed); the handlers are put back after."""
    import signal
    import time

    from marsvision.runtime.errors import EXIT_INTERRUPTED, interruptible

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    cleaned = []
    with pytest.raises(SystemExit) as stopped:
        with interruptible("cmd"):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler raises in here
            finally:
                os.kill(os.getpid(), signal.SIGINT)  # again, while cleaning up
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                cleaned.append(True)
    assert stopped.value.code == EXIT_INTERRUPTED and cleaned == [True]
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_and_sighup_stop_after_the_cleanups_and_say_so(
    name: str, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """`interruptible`: SIGHUP (the terminal closed) had its default handler, which killed the
    command before its cleanups (mars-export's staging folder of 270 MB stayed); SIGTERM said
    nothing. The hint is asked for once stopped (what there is to resume from by then)."""
    import signal
    import time

    from marsvision.runtime.errors import interruptible

    sig = getattr(signal, name)
    cleaned: list[bool] = []
    asked: list[bool] = []

    def hint() -> str:
        asked.append(True)
        return "; --resume continues"

    with pytest.raises(SystemExit) as stopped:
        with interruptible("cmd", hint=hint):
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises in here
            finally:
                assert not asked  # the hint is said after the cleanups
                cleaned.append(True)
    assert stopped.value.code == code and cleaned == [True] and asked == [True]
    assert capsys.readouterr().err == f"cmd: stopped by {name}; --resume continues\n"
    from marsvision.runtime.errors import stopping

    assert not stopping.is_set()  # set for the command's FIFO reads, over once it is stopped


@pytest.mark.parametrize("hangup", ["terminal closed", "kill -HUP"])
def test_a_terminal_that_closes_stops_the_command_with_129(hangup: str) -> None:
    """SIGHUP from a terminal that closed: every later write to it fails (EIO), a cleanup's too
    (mars-infer's progress line), and that error replaced the stop: exit 1 and a traceback. Such
    a terminal's descriptors go to /dev/null at the signal; a terminal still open (`kill -HUP`)
    keeps them, and shows the cleanups and the line that says why the command stopped."""
    child = """
import sys, time
from marsvision.runtime.errors import interruptible
with interruptible("cmd"):
    try:
        sys.stderr.write("ready\\n"); sys.stderr.flush()
        time.sleep(60)
    finally:
        time.sleep(0.3)  # the terminal is gone by now
        sys.stderr.write("cleaned\\n"); sys.stderr.flush()  # as mars-infer's progress ends
"""
    # pty.fork in a process of its own (pytest's has threads): the child's controlling terminal
    # is the pty, and closing its master side hangs it up
    launcher = f"""
import os, pty, select, signal, sys
pid, master = pty.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-c", {child!r}])
seen = b""
while b"ready" not in seen:
    assert select.select([master], [], [], 60)[0], seen
    seen += os.read(master, 1024)
if {hangup == "kill -HUP"!r}:
    os.kill(pid, signal.SIGHUP)
    try:
        while select.select([master], [], [], 60)[0] and (more := os.read(master, 1024)):
            seen += more
    except OSError:  # EIO: the child has exited and closed the terminal
        pass
else:
    os.close(master)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), seen.decode().split())
"""
    r = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    code, _, said = r.stdout.partition(" ")
    assert code == "129", r.stdout
    if hangup == "kill -HUP":
        assert said.strip() == "['ready', 'cleaned', 'cmd:', 'stopped', 'by', 'SIGHUP']"


def test_signals_held_are_handled_after_the_block() -> None:
    """`signals_held`: a SIGTERM in the block stops the command only once the block is done
    (mars-export's renames and the manifest that lists them)."""
    import signal
    import time

    from marsvision.runtime.errors import interruptible, signals_held

    done = []
    with pytest.raises(SystemExit) as stopped:
        with interruptible("cmd"):
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("block")
            time.sleep(1)  # handled here, at the latest
            done.append("after")
    assert stopped.value.code == 143 and done == ["block"]


def test_an_ignored_signal_stays_ignored() -> None:
    """A command started with SIGINT ignored (`cmd &` in a script, shielded from Ctrl-C) was
    stopped by it once `interruptible` set its handler."""
    import signal
    import time

    from marsvision.runtime.errors import interruptible

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interruptible("cmd"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_signal_as_a_temporary_file_or_folder_is_made_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C or SIGTERM (its handler raising) just as mkstemp or mkdtemp made the temporary
    file or folder, before its name was held by the block that removes it, left it behind (a CI
    run's SIGTERM test of int8_distill caught a hidden .tmp checkpoint): the atomic writes,
    mars-export's staging folder, the data download's unpacking folder."""
    from marsvision.export.artifacts import staging_dir
    from marsvision.runtime import files
    from marsvision.train.download import unpack_archive

    real_open, real_mkdir = os.open, os.mkdir

    def open_then_signal(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        os.close(real_open(path, flags, mode, **kw))
        raise KeyboardInterrupt  # as the signal handler would, right after the call

    def mkdir_then_signal(path: Any, mode: int = 0o777, **kw: Any) -> None:
        real_mkdir(path, mode, **kw)
        raise KeyboardInterrupt

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(os, "open", open_then_signal)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(out / "x.pt", b"data")
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(os, "mkdir", mkdir_then_signal)
    with pytest.raises(KeyboardInterrupt), staging_dir(out):
        pass
    with pytest.raises(KeyboardInterrupt):
        unpack_archive(out / "msl.zip", out / "msl", "msl")
    assert list(out.iterdir()) == []
    # a name already taken (another run's file) is not ours: another is drawn, that one kept
    monkeypatch.setattr(os, "mkdir", real_mkdir)
    draws = iter(["0000", "0001"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(draws))
    (out / ".x.pt.0000.tmp").write_bytes(b"theirs")
    files.atomic_write_bytes(out / "x.pt", b"data")
    assert sorted(p.name for p in out.iterdir()) == [".x.pt.0000.tmp", "x.pt"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux's /proc only")
def test_the_umask_is_read_without_setting_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """New files' modes come from the umask, which was read by setting it to 0 and back: a file
    another thread made in that moment (a decode thread, a writer) was open to all."""
    from marsvision.runtime import files

    def no_setting(mask: int) -> int:
        raise AssertionError(f"umask set to {mask:o}")

    before = os.umask(0o027)
    try:
        monkeypatch.setattr(files.os, "umask", no_setting)
        assert files.default_file_mode() == 0o640
        assert files.default_folder_mode() == 0o750
    finally:
        monkeypatch.undo()
        os.umask(before)


def test_threads_follow_a_container_cpu_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`docker run --cpus 2` (a Kubernetes CPU limit) leaves the affinity at every core of the
    machine: a thread per core ran throttled by the quota. cgroup v2 and v1, the tightest
    quota of the process's cgroup and those above it, rounded up."""
    from marsvision.runtime.host import usable_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)

    def tree(files: dict[str, str]) -> Path:
        root = tmp_path / f"cg{len(list(tmp_path.iterdir()))}"
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        root.mkdir(exist_ok=True)
        return root

    v2 = tree({"cpu.max": "200000 100000\n"})
    assert usable_cores(v2, own="0::/\n") == 2
    nested = tree({"cpu.max": "max 100000\n", "a/cpu.max": "150000 100000\n",
                   "a/b/cpu.max": "max 100000\n"})  # fmt: skip
    assert usable_cores(nested, own="0::/a/b\n") == 2  # 1.5 CPUs, from the cgroup above
    # v1, the container's own cgroup mounted as the root: its host path is not there
    v1 = tree(
        {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    )
    own = "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    assert usable_cores(v1, own=own) == 1
    # no quota, an unreadable or odd one, no cgroup file system: the affinity
    assert usable_cores(tree({"cpu.max": "max 100000\n"}), own="0::/\n") == 16
    assert usable_cores(tree({"cpu.max": "lots\n"}), own="0::/\n") == 16
    unlimited = tree({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert usable_cores(unlimited, own="3:cpu:/\n") == 16
    assert usable_cores(tmp_path / "none", own="0::/\n") == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert usable_cores(v2, own="0::/\n") == 1  # the affinity is tighter


def _results(path: Path, n: int) -> tuple[list[str], Any]:
    """A CSV results file of `n` rows, written by the runtime's ResultWriter: (header, its
    provenance)."""
    from marsvision.runtime.classifier import Prediction
    from marsvision.runtime.results import Provenance, ResultWriter, csv_header

    prov = Provenance("ab" * 32, "int8", "onnxruntime-cpu", "none")
    rows = [Prediction(f"img{i}.JPG", "ok", "Rover", (0.25, 0.75)) for i in range(n)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        ResultWriter(f, fmt="csv", class_names=["Surface", "Rover"], top_k=None,
                     provenance=prov, write_header=True).write(rows)  # fmt: skip
    return csv_header(["Surface", "Rover"], None), prov


def test_resume_refusals_no_run_reached(tmp_path: Path) -> None:
    """Each passed the suite when broken (a review's mutations): a whole row short of a column is
    refused; a file refused by the run's checks keeps its cut last row (it is cut only once the
    resume goes ahead); a run record that cannot be read is an error, not taken for none (that
    turned every record check off)."""
    from marsvision.runtime.resume import _resume_base, read_done

    out = tmp_path / "r.csv"
    header, prov = _results(out, 3)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2].rsplit(",", 1)[0] + "\n" + lines[3])
    with pytest.raises(MarsvisionError, match="row 3 is malformed; cannot resume from it"):
        read_done(str(out), fmt="csv", header=header, provenance=prov)

    _results(out, 3)
    cut = out.read_bytes()[:-10]  # a kill cut the last row
    out.write_bytes(cut)

    def refuse(done: dict[str, str]) -> None:
        raise MarsvisionError("another run's file")

    with pytest.raises(MarsvisionError, match="another run's file"):
        read_done(str(out), fmt="csv", header=header, provenance=prov, check=refuse)
    assert out.read_bytes() == cut
    assert len(read_done(str(out), fmt="csv", header=header, provenance=prov)) == 2
    assert out.read_bytes() == cut[: cut.rfind(b"\n") + 1]  # cut once it goes ahead

    (tmp_path / "r.csv.run.json").write_text('{"cut": ')
    run = {"fast_decode": False, "int8_sums": "fast", "library": "onnxruntime 1"}
    with pytest.raises(MarsvisionError, match=r"cannot read the run record .*r\.csv\.run\.json"):
        _resume_base(str(out), run=run, inputs=[], rows={})
    (tmp_path / "r.csv.run.json").write_text("[1]")  # JSON, but no record: an AttributeError
    with pytest.raises(MarsvisionError, match=r"run\.json \(not a JSON object\); delete it"):
        _resume_base(str(out), run=run, inputs=[], rows={})


def test_top_k_rows_keep_the_headers_columns(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """--top-k above the class count is the class count: 3 of a binary model wrote a 14-column
    header over 12-column rows, and an error row of --top-k 1 has every column too; both
    passed the suite with the clamp dropped (mars-bench score would refuse the file)."""
    from marsvision.benchmarks.predictions import read_predictions

    for k, inputs in (("3", images), ("1", [images[0], tmp_path / "missing.jpg"])):
        out = tmp_path / f"top{k}.csv"
        r = _infer(*inputs, "--engine", model, "--out", out, "--top-k", k)
        assert r.returncode in (0, 3), r.stderr
        rows = list(csv.reader(out.open(newline="")))
        assert len(rows) == 3 and len({len(row) for row in rows}) == 1, rows
        read_predictions(out)


def test_resuming_jsonl_with_another_top_k_is_refused(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """A JSONL file of --top-k 1 continued with --top-k 2 would hold rows of two shapes: refused
    (without the check the suite passed, and the file mixed them)."""
    out = tmp_path / "r.jsonl"
    r = _infer(images[0], "--engine", model, "--out", out, "--top-k", "1")
    assert r.returncode == 0, r.stderr
    r = _infer(*images, "--engine", model, "--out", out, "--resume", "--top-k", "2")
    assert r.returncode == 1 and b"another --top-k" in r.stderr, r.stderr
    assert len(out.read_text().splitlines()) == 1


def test_jsonl_paths_are_utf8_under_an_ascii_locale(
    model: Path, images: list[Path], tmp_path: Path
) -> None:
    """Under LC_ALL=C a UTF-8 file name is decoded with surrogates: the JSONL row must still
    hold the name as it is (`café.jpg`), not `caf\\udcc3\\udca9.jpg`."""
    (tmp_path / "imgs").mkdir()
    name = "caf\u00e9.jpg"
    shutil.copy(images[0], tmp_path / "imgs" / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k != "LANG"}
    r = subprocess.run([*MARS_INFER, "imgs", "--engine", str(model), "--out", "r.jsonl"],
                       capture_output=True, cwd=tmp_path,
                       env={**env, "LC_ALL": "C", "PYTHONUTF8": "0"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    (line,) = (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["path"] == f"imgs/{name}", line


def test_the_tightest_of_nested_cpu_quotas_sets_the_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container of 4 CPUs inside a parent cgroup (a Kubernetes pod, a systemd slice) of 1.5
    is held to 1.5 CPUs: the threads follow the tightest quota of the chain, rounded up, in
    either order (the loosest gave 4 threads throttled to 1.5 CPUs)."""
    from marsvision.runtime.host import usable_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    for outer, inner, want in (("150000", "400000", 2), ("800000", "300000", 3)):
        root = tmp_path / f"cg-{outer}-{inner}"
        (root / "pod" / "box").mkdir(parents=True)
        (root / "cpu.max").write_text("max 100000\n")
        (root / "pod" / "cpu.max").write_text(f"{outer} 100000\n")
        (root / "pod" / "box" / "cpu.max").write_text(f"{inner} 100000\n")
        assert usable_cores(root, own="0::/pod/box\n") == want


def test_a_cpu_model_line_without_a_name_is_not_the_model(tmp_path: Path) -> None:
    """Some virtual machines list `model name :` empty: the model is then the next CPU's name,
    else what `platform` says, never an empty string in the benchmark conditions."""
    from marsvision.runtime.host import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: \n\nprocessor\t: 1\nmodel name\t: Test 9000\n")
    assert cpu_model(info) == "Test 9000"
    info.write_text("processor\t: 0\nmodel name\t:\n")
    assert cpu_model(info) == (platform.processor() or platform.machine())
    assert cpu_model(info) != ""
