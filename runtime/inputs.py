"""Turn the PATH arguments of mars-infer into the list of input files, one entry per image.

A PATH is a file (any name: non-images become error rows), a folder (its image files, sorted;
with `recursive`, its subfolders too), a glob pattern (`'data/*.JPG'`, `**` with `recursive`),
or `@list.txt`: a text file with one path per line (blank lines and lines starting with `#`
are skipped; relative paths are relative to the current directory). In a folder, hidden files
and subfolders (names starting with `.`: macOS's `._IMG.JPG` resource copies on a card or disk
written by a Mac, `.Trashes`, editors' thumbnails) are skipped, as the shell and glob patterns
skip them; a hidden file named on its own, or in a list, is kept. A PATH that names nothing is
kept, so that it gets its own error row, and so is a folder with no image files in it, or one
that cannot be listed. Links to folders are followed, except back up or to a folder walked
before (for a pattern: under a name the pattern takes as it took that one). Each file appears
once, in the order given, under its first spelling: `imgs/a.jpg`, `./imgs/a.jpg` and its
absolute path are one input (`path_keys`).
"""

from __future__ import annotations

import bisect
import collections
import fnmatch
import glob
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path

from marsvision.runtime.errors import MarsvisionError

# what a folder's files are taken as images by (any file named on its own is tried); JPEG 2000,
# common in planetary archives, was passed over in a folder though Pillow reads it
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jp2",
     ".j2k"}
)  # fmt: skip
GLOB_CHARS = frozenset("*?[")  # a PATH holding one of these is a pattern


def _walk(
    top: str,
    unreadable: list[str],
    *,
    hidden: bool = False,
    state: Callable[[list[str]], Hashable] | None = None,
) -> Iterator[tuple[str, list[str], list[str]]]:
    """(folder, its file names, its subfolder names), sorted, for `top` and its subfolders,
    top-down, through links to folders, as os.walk (a caller may prune the subfolder list).
    A link back up to a folder the walk is inside (`loop -> .`) is not followed: glob's `**`
    followed such links some 40 levels deep, 2**40 paths for two of them, a hang. A folder
    reached again (by a link) is not walked again: it would give the same files, spelled
    another way, which are one input (`path_keys`); a chain of folders, each with two links to
    the next, took 2**depth walks. With `state`, a caller's function of the names from `top`
    to a folder, it is walked again where that differs (a pattern that may match under one
    name and not the other). Hidden subfolders are skipped unless `hidden`; a folder that
    cannot be listed goes to `unreadable` (os.walk passed over it without a word). A stack,
    not recursion: a tree some 1,000 folders deep ended the run in a RecursionError."""
    walked: set[tuple[tuple[int, int], Hashable]] = set()
    # (folder, the names from `top` to it, the folders it is inside), the next one last
    stack: list[tuple[str, tuple[str, ...], frozenset[tuple[int, int]]]] = [(top, (), frozenset())]
    while stack:
        folder, parts, above = stack.pop()
        try:
            st = os.stat(folder)
            here = (st.st_dev, st.st_ino)
            key = (here, None if state is None else state(list(parts)))
            if here in above or key in walked:
                continue
            walked.add(key)
            files, dirs = [], []
            # one entry at a time: a list of them kept each link's stat too (200 MB for 200,000)
            with os.scandir(folder) as it:
                for e in it:
                    try:
                        is_dir = e.is_dir()  # through a link
                    except OSError:
                        is_dir = False
                    if not is_dir:
                        files.append(e.name)
                    elif hidden or not e.name.startswith("."):
                        dirs.append(e.name)
        except OSError:
            unreadable.append(folder)
            continue
        # with `state` (a pattern, whose matches are sorted), in the order of the paths sorted:
        # `a-b/` before `a/`, so the spelling a folder reached twice keeps is the one sorted first
        dirs.sort(key=None if state is None else lambda d: d + os.sep)
        yield folder, sorted(files), dirs
        inside = above | {here}  # after the yield: the caller's pruning of `dirs` holds
        stack.extend((os.path.join(folder, d), (*parts, d), inside) for d in reversed(dirs))


def folder_images(
    d: str,
    recursive: bool = False,
    unreadable: list[str] | None = None,
    passed_over: collections.Counter[str] | None = None,
) -> list[str]:
    """The image files of folder `d` (and with `recursive` its subfolders, links to folders
    followed), sorted, hidden names skipped: what mars-infer classifies for a folder PATH. A
    subfolder that cannot be listed goes to `unreadable` where given (mars-infer gives it an
    error row); what else is there goes to `passed_over` where given, counted: subfolders not
    descended into ("/"), hidden files named as images (".") and other files by their ending
    ("" for none)."""
    found: list[str] = []
    sink: list[str] = [] if unreadable is None else unreadable
    for root, files, dirs in _walk(d, sink):
        for name in files:
            suffix = Path(name).suffix.lower()
            if name.startswith("."):  # a Mac's `._IMG.JPG` copies; `.DS_Store` not counted
                if passed_over is not None and suffix in IMAGE_SUFFIXES:
                    passed_over["."] += 1
                continue
            if suffix in IMAGE_SUFFIXES:
                found.append(os.path.join(root, name))
            elif passed_over is not None:
                passed_over[suffix] += 1
        if not recursive:
            if passed_over is not None and dirs:
                passed_over["/"] += len(dirs)
            break
    return found


def _in_walk_order(top: str, files: list[str], folders: list[str]) -> list[str]:
    """The image files of folder `top` and the subfolders that could not be listed, in the
    order of the walk (a folder's files, then its subfolders by name), each folder's row where
    its images would be: they came after all the files."""
    if not folders:
        return files

    def key(path: str, folder: bool) -> list[tuple[int, str]]:
        parts = os.path.relpath(path, top).split(os.sep)
        return [(1, p) for p in parts[: None if folder else -1]] + (
            [] if folder else [(0, parts[-1])]
        )

    ranked = [(key(p, False), p) for p in files] + [(key(p, True), p) for p in folders]
    return [p for _, p in sorted(ranked)]


def passed_over_note(folder: str, counts: collections.Counter[str]) -> str:
    """One line on what a folder PATH held besides the images classified (a subfolder or a
    JPEG 2000 file was passed over without a word)."""
    counts = counts.copy()  # the caller's stays whole
    parts = []
    if n := counts.pop("/", 0):
        parts.append(f"{n} subfolder{'s' * (n > 1)} (--recursive descends into them)")
    if n := counts.pop(".", 0):  # a folder of only those had the row "no image files"
        parts.append(f"{n} hidden image file{'s' * (n > 1)} (a name that starts with '.'; "
                     "name one to classify it)")  # fmt: skip
    if counts:
        kinds = ", ".join(f"{k or 'no ending'} {n}" for k, n in counts.most_common(5))
        more = ", ..." if len(counts) > 5 else ""
        n = sum(counts.values())
        parts.append(f"{n} file{'s' * (n > 1)} not named as images ({kinds}{more}; "
                     "name one to classify it)")  # fmt: skip
    return f"passed over in {folder}: " + "; ".join(parts)


def _component_match(
    parts: list[str], pats: list[str], *, start: bool = False, file: bool = False
) -> bool:
    """Whether the path components `parts` match the pattern components `pats` as glob's
    recursive matching does (`**` is any number of folders; a name starting with `.` matches
    only a pattern component starting with one; with `file`, the last part is a file, which
    only the last component or a `**` matches), or with `start`, whether a longer path that
    begins with `parts` may. The pattern positions reachable part by part (not recursion, one
    level per folder: a tree some 1,000 folders deep ended the run in a RecursionError)."""

    def with_skips(states: set[int]) -> set[int]:  # a `**` may match no folder at all
        out = set(states)
        for i in sorted(states):
            while i < len(pats) and pats[i] == "**":
                i += 1
                out.add(i)
        return out

    states = with_skips({0})
    for k, part in enumerate(parts):
        last, hidden = k == len(parts) - 1, part.startswith(".")
        following: set[int] = set()
        for i in states:
            if i == len(pats):
                continue
            if pats[i] == "**":
                if not hidden:
                    following.add(i)
            elif hidden and not pats[i].startswith("."):
                continue
            elif file and last and i < len(pats) - 1:  # only a folder goes on to the next
                continue
            elif fnmatch.fnmatchcase(part, pats[i]):
                following.add(i + 1)
        states = with_skips(following)
        if not states:
            return False
    if start:
        return any(i < len(pats) for i in states)
    return len(pats) in states


def _recursive_glob(pattern: str, unreadable: list[str]) -> list[str]:
    """glob.glob(pattern, recursive=True) (a trailing `/`: folders only), through links to
    folders but not back up them (`_walk`); only folders a match may lie in are listed, and
    of them those that cannot be go to `unreadable`."""
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if GLOB_CHARS & set(p))
    prefix = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    pats = [p for p in parts[first:] if p]
    folders_only = pattern.endswith("/")
    base = prefix or "."
    if not os.path.isdir(base):
        return []
    matches = [os.path.join(prefix, "")] if prefix and _component_match([], pats) else []

    def state(parts: list[str]) -> frozenset[int]:  # how much of the pattern `parts` can match
        return frozenset(i for i in range(len(pats) + 1) if _component_match(parts, pats[:i]))

    hidden = any(p.startswith(".") for p in pats)
    for root, files, dirs in _walk(base, unreadable, hidden=hidden, state=state):
        rel = os.path.relpath(root, base)
        here = [] if rel == "." else rel.split(os.sep)
        for name in dirs:
            if _component_match([*here, name], pats):
                matches.append(os.path.join(prefix, *here, name))
        for name in [] if folders_only else files:
            if _component_match([*here, name], pats, file=True):
                matches.append(os.path.join(prefix, *here, name))
        dirs[:] = [d for d in dirs if _component_match([*here, d], pats, start=True)]
    return matches


def utf8_path(path: str) -> str:
    """`path` as text files hold it (results, @lists): its bytes on the file system read as
    UTF-8, with surrogateescape for those that are not. Under a UTF-8 locale (Python's default)
    it is `path` itself; under an ASCII or Latin-1 one Python spells the bytes otherwise, and a
    results file held them re-encoded (`--resume` matched none of its rows)."""
    return os.fsencode(path).decode("utf-8", "surrogateescape")


def fs_path(text: str) -> str:
    """The path that `text`, as text files hold it (`utf8_path`), names in this locale."""
    return os.fsdecode(text.encode("utf-8", "surrogateescape"))


def decode_text(data: bytes, what: str, *, strict: bool = False) -> str:
    """A text file's bytes as text: UTF-8, a byte-order mark skipped (Windows Notepad and
    Excel's "CSV UTF-8" write one), bytes that are not UTF-8 kept as surrogates (with `strict`:
    an error); or UTF-16 with its mark (Windows PowerShell 5's `>`, Excel's "Unicode text",
    Notepad's "Unicode"). `what` names the file in the error ("the list file x.txt")."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise MarsvisionError(f"{what} is not UTF-16 text ({e.reason})") from None
    try:
        return data.decode("utf-8-sig", errors="strict" if strict else "surrogateescape")
    except UnicodeDecodeError as e:
        raise MarsvisionError(
            f"{what} is not UTF-8 text (byte {e.start}: {e.reason}): save it as UTF-8"
        ) from None


def is_list_arg(arg: str) -> bool:
    """Whether a PATH argument is an @list (`@` alone is a file's name)."""
    return arg.startswith("@") and len(arg) > 1


def _list_file(arg: str) -> list[str]:
    """The paths of an @list: UTF-8 (a byte-order mark skipped: Windows Notepad writes one) or
    UTF-16 with its mark (Windows PowerShell 5's `>` writes that); any line ending."""
    path = arg[1:]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise MarsvisionError(f"cannot read the list file {path} ({e.strerror})") from None
    text = decode_text(data, f"the list file {path}")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for n, line in enumerate(lines, start=1):
        if "\x00" in line:  # no path holds one: UTF-16 without its mark, or not a text file
            raise MarsvisionError(
                f"the list file {path} is not a text file of paths (line {n} holds a NUL "
                "byte): save it as UTF-8 text, one path per line"
            )
    return [fs_path(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def path_keys(paths: Iterable[str], *, base: str | None = None) -> list[str]:
    """What the spellings of each input path share (`imgs/a.jpg`, `./imgs/a.jpg`, `imgs//a.jpg`,
    its absolute path, a path through a symlinked folder): its folder's real path and its name,
    each folder resolved once (a folder holds thousands of images). Inputs are deduplicated by
    it, and --resume matches the rows already written by it, so a rerun that spells a folder
    another way writes no row twice. The folder is resolved on the file system (`link/../a.jpg`
    is the `a.jpg` next to the link's target, not the one beside the link), and the name is
    not: two symlinks to one file are two inputs. Relative paths are from `base` (default: the
    working folder)."""
    real: dict[str, str] = {}
    keys = []
    for path in paths:
        folder, name = os.path.split(path.rstrip(os.sep) or path)  # `d/` is `d`
        if folder not in real:
            real[folder] = os.path.realpath(os.path.join(base or ".", folder))
        keys.append(os.path.join(real[folder], name))
    return keys


def expand_inputs(
    args: list[str], *, recursive: bool = False, notes: list[str] | None = None
) -> list[str]:
    """The input files named by PATH arguments, in order, each once; a line for `notes` for
    each folder PATH that holds what is not classified (`passed_over_note`)."""
    out: list[str] = []
    empty: list[str] = []  # the @lists that name no file
    for arg in args:
        if is_list_arg(arg):
            listed = _list_file(arg)
            out.extend(listed)
            if not listed:
                empty.append(arg[1:])
        elif os.path.isdir(arg):
            unreadable: list[str] = []
            passed: collections.Counter[str] = collections.Counter()
            found = folder_images(arg, recursive, unreadable, passed)
            if passed and notes is not None:  # none found too: its row said only "none"
                notes.append(passed_over_note(arg, passed))
            # no images: the folder's error row
            out.extend(_in_walk_order(arg, found, unreadable) or [arg])
        elif not os.path.lexists(arg) and GLOB_CHARS & set(arg):
            unreadable = []
            deep = recursive and "**" in arg
            if deep:
                matches = sorted(_recursive_glob(arg, unreadable))
            else:
                matches = sorted(glob.glob(arg))
                # a ** folder part missed deeper images without a word
                if "**" in arg.replace(os.sep, "/").split("/") and notes is not None:
                    notes.append(f"{arg}: without --recursive (-r), ** is one folder level, as * "
                                 "is; add -r for any depth")  # fmt: skip
            folders: list[str] = []
            files: list[str] = []
            for m in matches:  # one stat each: a pattern may match 100,000 images
                (folders if os.path.isdir(m) else files).append(m)
            passed = collections.Counter()
            for m in folders:
                files.extend(folder_images(m, recursive, unreadable, passed))
            # (a recursive ** matches folders inside folders it matched: each file counted again)
            if passed and notes is not None and not deep:
                notes.append(passed_over_note(arg, passed))
            # no image: each folder matched gets a folder PATH's error row, no match the pattern
            for folder in unreadable:  # its row in path order, where its matches would be
                bisect.insort(files, folder)
            out.extend(files or folders or [arg])
        else:
            out.append(arg)
    if empty and not out:  # a nightly `find ... > list.txt` that failed passed as "0 ok", exit 0
        raise MarsvisionError(
            f"the list file {', '.join(empty)} names no file (it is empty, or holds only blank "
            "and # lines), and nothing else was given"
        )
    first: dict[str, str] = {}
    for key, path in zip(path_keys(out), out):
        first.setdefault(key, path)
    return list(first.values())
