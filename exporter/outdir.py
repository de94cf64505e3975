"""Output directories written safely: a lock per output path, a temp directory beside it, fsync,
an atomic swap into place, and cleanup of what killed writers left behind.

For an output ``DIR/NAME`` the writer uses, beside it in ``DIR``:

    .NAME.lock          held (flock) while a writer runs; removed when it ends
    .NAME.tmp-XXXXXXXX  the new directory being written
    .NAME.old-XXXXXXXX  the previous directory during a two-rename swap (only where an atomic
                        exchange is unavailable)

A live writer always holds the lock, so whoever holds it knows that any ``.NAME.tmp-*`` or
``.NAME.old-*`` directory is the leftover of a killed writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

log = logging.getLogger("moeport.exporter")

# renameat2(2): AT_FDCWD and RENAME_EXCHANGE from <fcntl.h>/<linux/fs.h>; syscall numbers for libcs
# without the wrapper (glibc < 2.28, some musl builds)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "i686": 353, "armv7l": 382, "ppc64le": 357, "s390x": 347}
_SYS_RENAMEAT2.update(dict.fromkeys(("aarch64", "riscv64", "loongarch64"), 276))  # asm-generic numbering
# errors meaning "this kernel or filesystem cannot exchange": fall back to two renames
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
_SUFFIX_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
_TEMP_SUFFIX = r"[a-z0-9_]{8}"  # also matches tempfile.mkdtemp's, which earlier versions used


class OutputError(ValueError):
    """The output path cannot be written: busy (another writer holds its lock) or not ours to replace."""


def output_path(path: str | Path) -> Path:
    """``path`` as given, or made absolute where its last part is not a name ("." or ".."): the lock and
    temp names are built from the name. The filesystem root has none and is refused."""
    out = Path(path)
    if out.name in ("", ".."):
        try:
            out = Path(os.path.abspath(out))
        except OSError as exc:  # the working directory was deleted
            raise OutputError(f"{path}: cannot tell which directory this is ({exc.strerror})") from exc
    if not out.name:
        raise OutputError(f"{path} cannot be an output directory (it has no name to write beside)")
    return out


class OutputLock:
    """An exclusive, non-blocking lock on an output path: ``.NAME.lock`` beside it, holding the writer's pid.

    The lock file is removed on release, so nothing stays beside the output. Removal is race-free
    because the holder unlinks it while still locked, and a writer that gets a lock re-checks that
    the path still names the file it locked (same inode); if not, it locked a file someone already
    released and unlinked, and it tries again on the current one. The kernel drops the lock of a
    killed writer; its lock file is reused (and removed) by the next one.
    """

    def __init__(self, out: Path, what: str = "export"):
        self.out = Path(out)
        self.what = what
        self.path = self.out.with_name(f".{self.out.name}.lock")
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            if fcntl is None and msvcrt is None:
                fd = self._create_exclusive()
            else:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                if not _try_lock(fd):
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise OutputError(self._busy(holder))
            if _same_file(fd, self.path):
                break
            os.close(fd)  # released and unlinked between our open and our lock: take the current file
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.what}\n".encode())
        self._fd = fd

    def _busy(self, holder: str) -> str:
        pid, _, what = holder.partition(" ")
        if not pid.isdigit():  # the holder has not written its pid yet
            return f"another {self.what} to {self.out} is running"
        return f"another {what.strip() or self.what} to {self.out} is running (pid {pid})"

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if fcntl is not None:
            if _same_file(fd, self.path):  # not if someone deleted it by hand and another writer made a new one
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # while still locked: see the class docstring
            os.close(fd)
            return
        # Windows refuses to delete a file another process has open, so unlinking after closing cannot
        # take a file from a writer that just opened it (it then keeps it); the exclusive-create lock is
        # the file's existence, released by the unlink
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _create_exclusive(self) -> int:
        """Without flock or msvcrt the lock is the file's existence (a killed writer's must be removed by hand)."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = self.path.read_text(errors="replace").strip() if self.path.is_file() else ""
            raise OutputError(f"{self._busy(holder)} (or was killed: then delete {self.path})") from None


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        raise
    return True


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode(errors="replace").strip()
    except OSError:  # Windows: the holder's locked byte cannot be read
        return ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev)


# -- leftovers ------------------------------------------------------------------------------------


def _leftover_pattern(out: Path, kind: str) -> re.Pattern[str]:
    suffix = _TEMP_SUFFIX if kind == "tmp" else rf"(?:{_TEMP_SUFFIX}|\d+)"  # earlier versions named it by pid
    return re.compile(re.escape(f".{out.name}.{kind}-") + suffix)


def leftovers(out: Path, kind: str) -> list[Path]:
    """``.NAME.tmp-*`` (kind "tmp") or ``.NAME.old-*`` (kind "old") directories beside ``out``, newest first."""
    pattern = _leftover_pattern(out, kind)
    try:
        entries = [e for e in os.scandir(out.parent) if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns, reverse=True)
    return [Path(e.path) for e in entries]


def restore_interrupted_swap(out: Path, is_complete: Callable[[Path], bool]) -> Path | None:
    """If ``out`` is missing but a complete ``.NAME.old-*`` is there (a writer was killed between its two
    renames), rename it back; call with the lock held. Returns the directory restored, if any."""
    if os.path.lexists(out):
        return None
    for old in leftovers(out, "old"):
        if is_complete(old):
            os.rename(old, out)
            fsync_dir(out.parent)
            log.warning("%s was missing after an interrupted export; restored the previous one from %s", out, old.name)
            return old
    return None


def remove_leftovers(out: Path) -> list[str]:
    """Delete the temp and old directories that killed writers left beside ``out``; call with the lock held."""
    removed = []
    for path in leftovers(out, "tmp") + leftovers(out, "old"):
        shutil.rmtree(path)
        removed.append(path.name)
    if removed:
        log.info("removed %d leftover(s) of interrupted writes to %s: %s", len(removed), out, ", ".join(removed))
    return removed


# -- writing and swapping -------------------------------------------------------------------------


def temp_dir(out: Path) -> Path:
    """A new empty ``.NAME.tmp-XXXXXXXX`` directory beside ``out`` (same filesystem, so renames are atomic).

    Made with the umask's permissions (not mkdtemp's 0700): it becomes ``out``, a directory like any other.
    """
    while True:
        path = out.with_name(f".{out.name}.tmp-{_random_suffix()}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _random_suffix() -> str:
    return "".join(secrets.choice(_SUFFIX_CHARS) for _ in range(8))


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Attach ``path`` to an OSError raised without a file name (a full disk while writing, flushing or closing)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDWR)
    try:
        with naming(path):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be opened."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        with naming(path):
            os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that do not sync directories
            raise
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the kernel, the libc
    or the filesystem cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    args = (
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(a)),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(b)),
        ctypes.c_uint(_RENAME_EXCHANGE),
    )
    if hasattr(libc, "renameat2"):
        rc = libc.renameat2(*args)
    elif platform.machine() in _SYS_RENAMEAT2:
        rc = libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), *args)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def publish(tmp: Path, out: Path, replace: bool) -> None:
    """Move the complete directory ``tmp`` to ``out``, fsynced, so that ``out`` is never missing.

    ``out`` is missing or an empty directory (a plain rename replaces it atomically), or, with
    ``replace``, a directory that is swapped atomically with ``tmp`` and then deleted. Call with the lock held.
    """
    fsync_dir(tmp)
    if replace and exchange(tmp, out):
        fsync_dir(out.parent)
        _remove_old(tmp)  # tmp now names the previous directory
        return
    if replace:  # two renames; a writer killed between them is repaired by restore_interrupted_swap
        old = out.with_name(f".{out.name}.old-{_random_suffix()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        fsync_dir(out.parent)
        _remove_old(old)
        return
    os.replace(tmp, out)  # fails (ENOTEMPTY, EEXIST, ENOTDIR) if something appeared at out meanwhile
    fsync_dir(out.parent)


def _remove_old(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("could not delete the previous directory %s; the next write to it will", path)


def describe_os_error(exc: OSError, out: Path, tmp: Path | None) -> str:
    """An OSError as words naming the file, with paths inside the temp directory shown as under ``out``."""
    reason = (exc.strerror or str(exc)).strip()
    reason = reason[:1].lower() + reason[1:]
    if not exc.filename:
        return reason
    name = Path(os.fsdecode(exc.filename))
    if tmp is not None and (name == tmp or tmp in name.parents):
        return f"{reason} writing {out / name.relative_to(tmp)}"
    return f"{reason} ({name})"
