"""One resolver for every file that an artifact or a checkpoint names.

Files named inside downloaded data (a manifest's ``files``, a shard index's ``weight_map``, an ONNX
graph's external-data locations) are attacker-controlled strings. Every such name goes through
:func:`check_name` (a plain relative path: no absolute path, no ``..``, no backslash, no NUL) and is
opened with :func:`open_inside`, which refuses anything whose real path leaves the directory (a symlink
to ``/etc/passwd``, a directory swapped for a symlink between the check and the open) and anything that
is not a regular file. The caller then reads, hashes and maps the file from the returned descriptor,
never by its path again, so what was checked is what is used.

Hugging Face's hub cache stores a snapshot's files as symlinks into the repository's ``blobs/``
folder; :func:`hub_blobs` names that folder so that checkpoint readers can allow exactly it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

MAX_NAME = 1024  # bytes in a name (every real artifact or checkpoint file name is far shorter)


class UnsafePathError(ValueError):
    """A name that is not a plain relative path inside its directory, or a file that leaves it."""


def check_name(name: object, what: str = "file") -> str:
    """``name`` if it is a plain relative POSIX path, else :class:`UnsafePathError` naming the problem."""
    if not isinstance(name, str):
        raise UnsafePathError(f"{what} name must be a string, got {type(name).__name__} {name!r:.80}")
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise UnsafePathError(f"{what} name {name!r:.80} is empty or too long")
    if "\x00" in name or "\\" in name:
        raise UnsafePathError(f"{what} name {name!r:.80} contains a NUL or a backslash")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"{what} name {name!r:.80} is an absolute path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"{what} name {name!r:.80} is not a plain relative path (empty, '.' or '..' part)")
    return name


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def hub_blobs(directory: Path) -> Path | None:
    """The ``blobs/`` folder of a Hugging Face hub cache repository when ``directory`` is one of its
    snapshots (``models--org--name/snapshots/<revision>``), else None."""
    real = Path(os.path.realpath(directory))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        blobs = real.parent.parent / "blobs"
        return blobs if blobs.is_dir() else None
    return None


def resolve_inside(root: str | Path, name: str, what: str = "file", also: Sequence[Path] = ()) -> Path:
    """The real path of ``root/name``, refused unless it stays inside ``root`` (or one of ``also``)."""
    check_name(name, what)
    roots = [os.path.realpath(root), *(os.path.realpath(a) for a in also)]
    real = os.path.realpath(os.path.join(root, name))
    if not _inside(real, roots):
        raise UnsafePathError(f"{what} {name!r} resolves to {real}, outside {roots[0]} (a symlink leaving it?)")
    return Path(real)


def open_inside(
    root: str | Path, name: str, what: str = "file", also: Sequence[Path] = ()
) -> tuple[int, os.stat_result]:
    """Open ``root/name`` read-only and return ``(fd, fstat)``; refused unless the file that was opened is
    a regular file whose real path is inside ``root`` (or one of ``also``). Raises FileNotFoundError
    when it does not exist. The caller owns (and closes) the descriptor."""
    real = resolve_inside(root, name, what, also)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise UnsafePathError(f"{what} {name!r}: cannot open ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{what} {name!r} is not a regular file")
        # what was opened, not what the path names now: a directory swapped for a symlink after the
        # realpath above shows up here
        opened = _fd_path(fd)
        roots = [os.path.realpath(root), *(os.path.realpath(a) for a in also)]
        if opened is not None and not _inside(opened, roots):
            raise UnsafePathError(f"{what} {name!r} was opened as {opened}, outside {roots[0]}")
        if opened is None:  # no /proc: compare the opened inode with the checked path's
            now = os.stat(real, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise UnsafePathError(f"{what} {name!r} changed while it was being opened")
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def read_fd(fd: int, size: int, offset: int = 0) -> bytes:
    """``size`` bytes at ``offset`` of an open file (fewer at its end), through ``pread`` (the descriptor's
    own offset is left alone)."""
    parts, done = [], 0
    while done < size:
        part = os.pread(fd, size - done, offset + done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def read_inside(
    root: str | Path, name: str, what: str = "file", max_bytes: int = 16 << 20, also: Sequence[Path] = ()
) -> bytes:
    """The whole of ``root/name`` (opened with :func:`open_inside`), refused as :class:`UnsafePathError`
    when larger than ``max_bytes``: the small JSON files of artifacts and checkpoints, read at once."""
    fd, st = open_inside(root, name, what, also)
    try:
        if st.st_size > max_bytes:
            raise UnsafePathError(f"{what} {name!r}: {st.st_size} bytes, more than {max_bytes} allowed")
        return read_fd(fd, st.st_size)
    finally:
        os.close(fd)
