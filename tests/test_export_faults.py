"""Export faults: --force replaces only moeport's artifacts, a killed export loses nothing and leaves
nothing behind, concurrent exports are refused, data is fsynced, a full disk is one clean error."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from moeport.exporter import ExportError, export, graph, outdir, read_artifact
from moeport.exporter.outdir import OutputError, OutputLock
from moeport.tools import checkpoints
from moeport.tools.checkpoints import make_checkpoint
from moeport.tools.cli import main

export_module = importlib.import_module("moeport.exporter.export")  # the package's `export` is the function
needs_posix_signals = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by sha256: equal snapshots mean byte-identical trees."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(out: Path) -> list[str]:
    """What an export may leave beside ``out``: temp, old and lock files."""
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-", f".{out.name}.lock")
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(prefixes))


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


# -- --force replaces only moeport's own artifacts --------------------------------------------------


def _plain_directory(out: Path, ckpt: Path) -> None:
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")


def _other_manifest(out: Path, ckpt: Path) -> None:
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "someone-elses", "files": {}}))


def _broken_manifest(out: Path, ckpt: Path) -> None:
    out.mkdir()
    (out / "manifest.json").write_text("{not json")


def _regular_file(out: Path, ckpt: Path) -> None:
    out.write_text("a file, not a directory")


def _symlink_to_artifact(out: Path, ckpt: Path) -> None:
    target = out.with_name("elsewhere")
    export(ckpt, target)
    out.symlink_to(target, target_is_directory=True)


@pytest.mark.parametrize(
    "make, why",
    [
        (_plain_directory, "not a moeport artifact \\(no manifest.json\\)"),
        (_other_manifest, 'not a moeport artifact \\(manifest.json does not say "format": "moeport-artifact"\\)'),
        (_broken_manifest, "not a moeport artifact \\(manifest.json is not readable JSON"),
        (_regular_file, "exists and is not a directory"),
        (_symlink_to_artifact, "is a symbolic link"),
    ],
)
def test_force_refuses_what_is_not_a_moeport_artifact(tiny_checkpoint, tmp_path, make, why):
    out = tmp_path / "out"
    make(out, tiny_checkpoint)
    before = {p.name: snapshot(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ExportError, match=why) as info:
        export(tiny_checkpoint, out, force=True)
    assert str(out) in str(info.value)
    assert "moeport only replaces its own artifacts" in str(info.value) or "only replaces moeport's own" in str(
        info.value
    )
    after = {p.name: snapshot(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # untouched, and nothing added beside it


def test_force_replaces_an_artifact_and_an_empty_directory_needs_no_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    export(tiny_checkpoint, out, max_seq_len=256)  # an empty directory is free to use
    assert read_artifact(out).max_seq_len == 256
    export(tiny_checkpoint, out, force=True)
    assert read_artifact(out, verify=True).max_seq_len == 512
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- SIGKILL at random points of an export ----------------------------------------------------------

# A fork server: imports moeport and warms it up with one export, then for each line
# "CKPT<TAB>OUT<TAB>MAX_SEQ_LEN" forks one process that runs `export(..., force=True)` and prints its pid;
# on "reap" it waits for that process and prints its exit code (negative: killed by that signal). A
# process per export, without paying the ~1 s import each time.
_FORK_SERVER = """
import os, sys, tempfile, traceback
from moeport.exporter.export import export

export(sys.argv[1], tempfile.mkdtemp(dir=sys.argv[2]) + "/warm-up")
print("ready", flush=True)
for line in sys.stdin:
    ckpt, out, seq = line.rstrip("\\n").split("\\t")
    pid = os.fork()
    if pid == 0:
        try:
            export(ckpt, out, max_seq_len=int(seq), force=True)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    print(pid, flush=True)
    assert sys.stdin.readline() == "reap\\n"
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def _child_env() -> dict[str, str]:
    """This interpreter's import path (the worktree shim, or site-packages in CI) for a child process."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OPENBLAS_NUM_THREADS="1")


class _ForkServer:
    def __init__(self, ckpt: Path, scratch: Path):
        scratch.mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER, str(ckpt), str(scratch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=scratch,  # outside the repository, so moeport is imported from sys.path as here
            env=_child_env(),
        )
        assert self._read() == "ready"

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        assert line, f"fork server died (exit code {self.proc.poll()})"
        return line.strip()

    def start(self, ckpt: Path, out: Path, max_seq_len: int) -> int:
        self.proc.stdin.write(f"{ckpt}\t{out}\t{max_seq_len}\n")
        self.proc.stdin.flush()
        return int(self._read())

    def reap(self) -> int:
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        return int(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


@needs_posix_signals
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the test's fork server needs fork")
def test_sigkill_at_random_points_leaves_the_old_or_the_new_artifact(tmp_path):
    # a deep, narrow model, so one export takes long enough (~0.5 s here) to land kills in every phase
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", overrides={"num_hidden_layers": 64, "n_routed_experts": 16})
    refs = {seq: snapshot(export(ckpt, tmp_path / "refs" / str(seq), max_seq_len=seq)) for seq in (256, 512)}
    assert refs[256] != refs[512]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    server = _ForkServer(ckpt, tmp_path / "scratch")
    rng = random.Random(1234)
    n_kills = 24
    outcomes = {"old": 0, "new": 0}
    phases: Counter[str] = Counter()  # what each kill left: where in the export it landed
    finished_before_kill = left_something = 0
    current = None  # max_seq_len of the artifact now at out

    def full_run() -> float:
        """One export run to the end (the next kill's old artifact); how long it took here, now."""
        nonlocal current
        current = 512 if current == 256 else 256
        t0 = time.perf_counter()
        server.start(ckpt, out, current)
        assert server.reap() == 0
        return time.perf_counter() - t0

    try:
        span = sorted(full_run() for _ in range(3))[1]
        for kill in range(n_kills):
            # uniform over the whole export, and every fourth kill close to its end (the swap, the cleanup),
            # timed by a full run just before it, as the machine's load changes
            if kill % 4 == 3:
                span = full_run()
                delay = span * rng.uniform(0.85, 1.1)
            else:
                delay = span * rng.uniform(0.0, 1.0)
            target = 512 if current == 256 else 256
            t0 = time.perf_counter()
            pid = server.start(ckpt, out, target)
            time.sleep(max(0.0, delay - (time.perf_counter() - t0)))
            os.kill(pid, signal.SIGKILL)  # not yet reaped: the pid is still this export's
            code = server.reap()
            assert code in (0, -signal.SIGKILL), f"export exited with {code}"
            finished_before_kill += code == 0
            where = f"kill {kill + 1} after {delay:.3f}s"
            assert out.is_dir(), f"{where} left no artifact at {out}: {sorted(os.listdir(work))}"
            now = snapshot(out)
            assert now in (refs[current], refs[target]), f"{where}: {out} holds neither the old nor the new artifact"
            read_artifact(out, verify=True)
            outcome = "new" if now == refs[target] else "old"
            left = {name.split("-")[0].rsplit(".", 1)[-1] for name in leftovers(out)}  # tmp, old, lock
            written = outcome == "old" and any((p / "manifest.json").exists() for p in work.glob(".out.tmp-*"))
            phases[f"{outcome}, left {'+'.join(sorted(left)) or 'nothing'}{' (all written)' if written else ''}"] += 1
            outcomes[outcome] += 1
            current = target if outcome == "new" else current
            left_something += bool(left)
        target = 512 if current == 256 else 256  # one more export to the same path, run to the end
        server.start(ckpt, out, target)
        assert server.reap() == 0
    finally:
        server.close()
    assert snapshot(out) == refs[target]
    assert leftovers(out) == [] and os.listdir(work) == ["out"]
    print(
        f"\nSIGKILL figures: {n_kills} kills over an export of ~{span:.2f}s: the old artifact left {outcomes['old']}, "
        f"the new one {outcomes['new']} ({finished_before_kill} of them had already finished), none empty; "
        f"{left_something} kills left temp/old/lock files beside it, the next export left 0; "
        f"by what they left: {dict(phases)}"
    )
    assert outcomes["old"] > 0 and left_something > 0  # kills did land inside exports


_KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from moeport.exporter import outdir
from moeport.exporter.export import export

outdir.exchange = lambda a, b: False  # a filesystem without RENAME_EXCHANGE: the two-rename swap
real_rename = os.rename

def rename(src, dst):
    real_rename(src, dst)
    if ".old-" in os.fspath(dst):  # the old artifact is aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename
export(sys.argv[1], sys.argv[2], max_seq_len=512, force=True)
"""


@needs_posix_signals
def test_an_export_killed_between_the_two_renames_is_repaired_by_the_next(tiny_checkpoint, tmp_path):
    out = export(tiny_checkpoint, tmp_path / "out", max_seq_len=256)
    old = snapshot(out)
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_BETWEEN_RENAMES, str(tiny_checkpoint), str(out)],
        cwd=tmp_path,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not out.exists() and len(leftovers(out)) == 3  # the worst moment: .out.old-*, .out.tmp-*, .out.lock
    # the next export restores the old artifact first; without --force it then refuses to replace it
    with pytest.raises(ExportError, match="exists and is not empty \\(use --force"):
        export(tiny_checkpoint, out)
    assert snapshot(out) == old
    assert leftovers(out) == []
    export(tiny_checkpoint, out, force=True)
    assert read_artifact(out, verify=True).max_seq_len == 512
    assert leftovers(out) == []


def test_the_two_rename_swap_where_exchange_is_unsupported(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(outdir, "exchange", lambda a, b: False)
    out = export(tiny_checkpoint, tmp_path / "out", max_seq_len=256)
    export(tiny_checkpoint, out, force=True)
    assert read_artifact(out, verify=True).max_seq_len == 512
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_swaps_two_directories_atomically(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from-a").touch()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "from-b").touch()
    assert outdir.exchange(tmp_path / "a", tmp_path / "b")
    assert os.listdir(tmp_path / "a") == ["from-b"] and os.listdir(tmp_path / "b") == ["from-a"]
    with pytest.raises(FileNotFoundError):
        outdir.exchange(tmp_path / "a", tmp_path / "missing")


# -- stale leftovers, concurrency, the lock ---------------------------------------------------------


def test_leftovers_of_killed_exports_are_removed_by_the_next(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    for name in (".out.tmp-ab12cd34", ".out.tmp-zz_9x7w6", ".out.old-0f0f0f0f", ".out.old-4242"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx.data").write_bytes(b"\0" * 65536)  # a half-written artifact
    (tmp_path / ".out.lock").write_text("999999 export\n")  # a killed export's lock file (not locked)
    not_ours = [".out.tmp-b.tmp-ab12cd34", ".out.tmp-notes.txt", ".other.tmp-ab12cd34"]  # e.g. output "out.tmp-b"
    for name in not_ours:
        (tmp_path / name).mkdir()
    (tmp_path / ".out.old-deadbeef").write_text("a file: not a directory this code could have made")
    export(tiny_checkpoint, out)
    read_artifact(out, verify=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["out", ".out.old-deadbeef", *not_ours])


def test_a_concurrent_export_to_the_same_path_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    started, go_on = threading.Event(), threading.Event()

    def progress(total: int):
        def tick(nbytes: int) -> None:
            started.set()
            assert go_on.wait(60)

        return tick

    first: dict[str, object] = {}

    def run_first() -> None:
        try:
            first["out"] = export(tiny_checkpoint, out, progress=progress)
        except BaseException as exc:  # reported by the main thread
            first["error"] = exc

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        assert started.wait(60)
        message = f"another export to {out} is running (pid {os.getpid()})"
        for force in (False, True):
            with pytest.raises(ExportError, match=re.escape(message)):
                export(tiny_checkpoint, out, force=force)
        result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), str(out), "--force", "--quiet"])
        assert result.exit_code == 1 and one_line(result.output) == f"Error: {message}"
    finally:
        go_on.set()
        thread.join(60)
    assert "error" not in first, first.get("error")
    read_artifact(out, verify=True)
    assert os.listdir(tmp_path) == ["out"]


def test_the_lock_file_can_be_unlinked_without_a_race(tmp_path, monkeypatch):
    out = tmp_path / "out"
    holder = OutputLock(out)
    holder.acquire()
    contender = OutputLock(out)
    real_try_lock = outdir._try_lock
    calls = []

    def holder_finishes_between_open_and_lock(fd: int) -> bool:
        calls.append(fd)
        if len(calls) == 1:
            holder.release()  # unlinks the file the contender has just opened
        return real_try_lock(fd)

    monkeypatch.setattr(outdir, "_try_lock", holder_finishes_between_open_and_lock)
    contender.acquire()  # its lock on the unlinked file is worthless: it must retry on a new one
    monkeypatch.undo()
    assert len(calls) == 2
    with pytest.raises(OutputError, match=f"another export to {re.escape(str(out))} is running"):
        OutputLock(out).acquire()  # the lock the contender holds is the one at the path
    contender.release()
    assert os.listdir(tmp_path) == []


def test_without_fcntl_the_lock_is_an_exclusively_created_file(tmp_path, monkeypatch):
    monkeypatch.setattr(outdir, "fcntl", None)
    monkeypatch.setattr(outdir, "msvcrt", None)
    out = tmp_path / "out"
    with OutputLock(out):
        with pytest.raises(OutputError, match=f"is running \\(pid {os.getpid()}\\) \\(or was killed: then delete"):
            OutputLock(out).acquire()
    with OutputLock(out):  # released: free again
        pass
    assert os.listdir(tmp_path) == []


# -- durability and disk faults --------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsynced descriptors through /proc")
@pytest.mark.parametrize("replace", [False, True])
def test_every_file_and_directory_is_fsynced_before_and_after_the_rename(
    tiny_checkpoint, tmp_path, monkeypatch, replace
):
    out = tmp_path / "out"
    if replace:
        export(tiny_checkpoint, out, max_seq_len=256)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    export(tiny_checkpoint, out, force=replace)
    monkeypatch.undo()
    tmp_dirs = {Path(p).name for p in synced if Path(p).name.startswith(".out.tmp-")}
    assert len(tmp_dirs) == 1, synced
    tmp = str(tmp_path / tmp_dirs.pop())
    files = [*read_artifact(out).manifest["files"], "manifest.json"]
    assert "generation_config.json" in files  # side files too
    for name in files:
        assert f"{tmp}/{name}" in synced, f"{name} was not fsynced: {synced}"
    last_file = max(synced.index(f"{tmp}/{name}") for name in files)
    assert synced.index(tmp) > last_file  # the directory after its files, before the rename
    assert synced[-1] == str(tmp_path)  # the parent after the rename


class _FullDisk:
    """A file whose disk fills after ``room`` bytes (as write() does with ENOSPC)."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _weights_fill_the_disk(monkeypatch) -> None:
    real_init = graph.WeightFile.__init__

    def init(self, path):
        real_init(self, path)
        self._f = _FullDisk(self._f, room=100_000)

    monkeypatch.setattr(graph.WeightFile, "__init__", init)


def _graph_fsync_fails(monkeypatch) -> None:
    real = export_module.fsync_file

    def fsync_file(path: Path) -> None:
        if path.name == "model.onnx":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path)

    monkeypatch.setattr(export_module, "fsync_file", fsync_file)


@pytest.mark.parametrize(
    "fault, file", [(_weights_fill_the_disk, "model.onnx.data"), (_graph_fsync_fails, "model.onnx")]
)
def test_a_full_disk_is_one_error_and_keeps_the_old_artifact(tiny_checkpoint, tmp_path, monkeypatch, fault, file):
    out = export(tiny_checkpoint, tmp_path / "out", max_seq_len=256)
    old = snapshot(out)
    fault(monkeypatch)
    expected = f"export to {out} failed: no space left on device writing {out / file}"
    with pytest.raises(ExportError) as info:
        export(tiny_checkpoint, out, force=True)
    assert str(info.value) == expected
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), str(out), "--force", "--quiet"])
    assert result.exit_code == 1 and one_line(result.output) == f"Error: {expected}"
    assert snapshot(out) == old
    assert os.listdir(tmp_path) == ["out"]  # the temp directory is gone


# -- make-checkpoint --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("keep me"), "exists and is not a directory"),
        (lambda p: (p.mkdir(), (p / "keep").write_text("keep me")), "exists and is not empty"),
    ],
)
def test_make_checkpoint_onto_a_file_or_a_full_directory_is_one_clean_line(tmp_path, make, message):
    out = tmp_path / "out"
    make(out)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["make-checkpoint", str(out)])
    assert result.exit_code == 1
    assert one_line(result.output) == f"Error: {out} {message}"
    with pytest.raises(OutputError, match=message):
        make_checkpoint(out)
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_make_checkpoint_writes_atomically(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    (tmp_path / ".ckpt.tmp-k1lled00").mkdir()  # a killed run's temp directory
    real_write = checkpoints.write_safetensors

    def write_then_fill_the_disk(path, *args):
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints, "write_safetensors", write_then_fill_the_disk)
    with pytest.raises(OutputError, match=re.escape(f"no space left on device writing {out / 'model.safetensors'}")):
        make_checkpoint(out)
    assert os.listdir(tmp_path) == []  # nothing half-written, the old temp directory removed too
    monkeypatch.setattr(checkpoints, "write_safetensors", real_write)
    (tmp_path / "ckpt").mkdir()  # an empty directory is fine
    make_checkpoint(out)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["ckpt"]
