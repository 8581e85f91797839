"""Copy what a preset command wrote into the run directory the executor publishes, safely.

The output directory is the command's: it may hold symlinks and hard links to runner secrets,
FIFOs and devices, control characters in names, a tree 1,000 levels deep, or a million files. The
walk is iterative and relative to open directory descriptors; every file is opened with
O_NOFOLLOW | O_NONBLOCK and kept only when fstat says it is a regular file with one link; names,
depth, path length, file count and bytes are capped. Whatever is left out is listed with why.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MAX_FILES = 10_000
MAX_ENTRIES = 20_000
MAX_DEPTH = 32
MAX_PATH_CHARS = 1024
MAX_FILE_BYTES = 8 << 30
MAX_TOTAL_BYTES = 16 << 30
_NAME = re.compile(r"[A-Za-z0-9_.+=@,-]{1,128}")
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1 << 20


@dataclass
class Copied:
    omitted: dict[str, str] = field(default_factory=dict)  # relative path -> why
    files: int = 0
    total: int = 0


def copy_tree(src: Path, dst: Path, label: str) -> Copied:
    """Copy the regular files under `src` into `dst`; paths in the result start with `label`."""
    copied = Copied()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        root = os.open(src, _OPEN | os.O_DIRECTORY)
    except OSError as exc:
        copied.omitted[label] = f"not readable: {exc.strerror}"
        return copied
    try:
        _walk(root, dst, label, copied)
    finally:
        os.close(root)
    return copied


def _walk(root: int, dst: Path, label: str, copied: Copied) -> None:
    """Depth-first without recursion; only the root stays open, each directory is reopened from
    it one O_NOFOLLOW step at a time (so a directory swapped for a symlink is refused)."""
    stack: list[tuple[str, ...]] = [()]
    examined = 0
    while stack:
        parts = stack.pop()
        fd = _open_dir(root, parts)
        if fd is None:
            copied.omitted["/".join((label, *parts))] = "not a directory any more"
            continue
        with os.scandir(fd) as listing:
            entries = sorted((e.name, e.stat(follow_symlinks=False).st_mode) for e in listing)
        for name, mode in entries:
            examined += 1
            if examined > MAX_ENTRIES:
                copied.omitted[label] = f"more than {MAX_ENTRIES} entries: the rest not examined"
                os.close(fd)
                return
            path = "/".join((label, *parts, name))
            target = dst.joinpath(*parts, name)
            if why := _refused(name, path, len(parts), mode, copied):
                copied.omitted["/".join((label, *parts, shown(name)))] = why
            elif stat.S_ISDIR(mode):
                target.mkdir()
                stack.append((*parts, name))
            else:
                _copy_file(fd, name, target, path, copied)
        os.close(fd)


def _open_dir(root: int, parts: tuple[str, ...]) -> int | None:
    fd = os.dup(root)
    for name in parts:
        try:
            child = os.open(name, _OPEN | os.O_DIRECTORY, dir_fd=fd)
        except OSError:
            child = None
        os.close(fd)
        if child is None:
            return None
        fd = child
    return fd


def copy_file(src: Path, dst: Path, rel: str, copied: Copied, keep_tail: int) -> None:
    """One file the executor knows by name (a log): same checks, only its last `keep_tail`
    bytes, after a line saying how much was dropped."""
    if (opened := _open_regular(src, rel, copied)) is None:
        return
    f, info = opened
    with f, dst.open("wb") as out:
        dropped = max(0, info.st_size - keep_tail)
        f.seek(dropped)
        if dropped:
            out.write(f"[... {dropped} earlier bytes dropped ...]\n".encode())
        out.write(f.read(keep_tail))


def _open_regular(path: Path | str, rel: str, copied: Copied,
                  dir_fd: int | None = None) -> tuple[BinaryIO, os.stat_result] | None:
    """Open without following a symlink or blocking on a FIFO, and keep it only when the open
    descriptor is a regular file (the name may have been swapped); else say why in `copied`."""
    try:
        fd = os.open(path, _OPEN, dir_fd=dir_fd)
    except OSError as exc:
        copied.omitted[rel] = f"not readable: {exc.strerror}"
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        copied.omitted[rel] = "not a regular file"
        return None
    return os.fdopen(fd, "rb"), info


def _refused(name: str, path: str, depth: int, mode: int, copied: Copied) -> str | None:
    if not _NAME.fullmatch(name) or name in (".", "..") or _is_git_name(name):
        return "name not allowed (letters, digits and _.+=@,- only; not .git)"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "not a regular file"
    if depth >= MAX_DEPTH:
        return f"deeper than {MAX_DEPTH} directories"
    if len(path) > MAX_PATH_CHARS:
        return f"path longer than {MAX_PATH_CHARS} characters"
    if stat.S_ISREG(mode) and copied.files >= MAX_FILES:
        return f"more than {MAX_FILES} files"
    return None


def _is_git_name(name: str) -> bool:
    """Names git refuses in a tree on any filesystem (.git, .GIT., git~1)."""
    folded = name.casefold().rstrip(". ")
    return folded == ".git" or re.fullmatch(r"git~[0-9]+", folded) is not None


def _copy_file(dir_fd: int, name: str, dst: Path, path: str, copied: Copied) -> None:
    if (opened := _open_regular(name, path, copied, dir_fd)) is None:
        return
    f, info = opened
    with f:
        if info.st_nlink > 1:
            copied.omitted[path] = "hard link"
        elif info.st_size > MAX_FILE_BYTES or copied.total + info.st_size > MAX_TOTAL_BYTES:
            copied.omitted[path] = (f"larger than the copy limit ({MAX_FILE_BYTES} bytes per "
                                    f"file, {MAX_TOTAL_BYTES} in all)")
        else:
            _copy_bytes(f, dst, info.st_size)
            copied.files += 1
            copied.total += info.st_size


def _copy_bytes(f: BinaryIO, dst: Path, size: int) -> None:
    """Copy at most `size` bytes: a file still growing is cut there."""
    left = size
    with dst.open("wb") as out:
        while left and (chunk := f.read(min(_CHUNK, left))):
            out.write(chunk)
            left -= len(chunk)


def shown(name: str) -> str:
    """A name as it may appear in a summary: control and undecodable characters escaped."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return ascii(name)[1:-1]
    return name if name.isprintable() else ascii(name)[1:-1]
