"""The artifact manifest: what an exported directory holds and how to check it.

An artifact directory is::

    manifest.json         this file's content (format version, model config, I/O, cache layout, sha256s)
    model.onnx            the graph (prefill and decode share it)
    model.onnx.data       weights as ONNX external data, 4 KiB aligned
    tokenizer.json ...    tokenizer / chat template / generation config, copied when the checkpoint has them
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeport.models.config import DeepseekConfig

FORMAT = "moeport-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact directory is missing, from an unknown format version, or damaged."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A loaded manifest plus the directory it describes."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def config(self) -> DeepseekConfig:
        return DeepseekConfig.from_dict(self.manifest["model"]["config"])

    @property
    def graph_path(self) -> Path:
        return self.directory / self.manifest["graph"]["file"]

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["model"]["config"]["vocab_size"])

    @property
    def cache(self) -> dict[str, Any]:
        return self.manifest["cache"]

    def content_id(self) -> bytes:
        """The artifact's files by checksum, as canonical bytes: what a compiled form derived from it depends
        on (backends hash it into the keys of their compiled caches)."""
        files = self.manifest.get("files", {})
        return json.dumps({k: v.get("sha256") for k, v in sorted(files.items())}, sort_keys=True).encode()

    def file(self, name: str) -> Path | None:
        """A copied side file (tokenizer.json, generation_config.json, ...) if the artifact has it."""
        if name in self.manifest.get("files", {}):
            return self.directory / name
        return None

    def verify(self, use_cache: bool = True) -> None:
        """Check every file's sha256 against the manifest (raises :class:`ArtifactError`).

        With ``use_cache``, a file whose size, mtime and inode are unchanged since it last hashed
        correctly on this machine is not hashed again (as git's index does), so loading a large
        artifact does not re-read gigabytes; any write to the file changes its mtime and forces a
        full check. ``moeport inspect`` always hashes everything.
        """
        cache = _VerifiedCache() if use_cache else None
        for name, meta in self.manifest["files"].items():
            path = self.directory / name
            if not path.is_file():
                raise ArtifactError(f"{self.directory}: file {name} listed in {MANIFEST} is missing")
            st = path.stat()
            if st.st_size != meta["size"]:
                raise ArtifactError(
                    f"{self.directory}: size of {name} does not match {MANIFEST} (damaged or "
                    "truncated; re-export the artifact)"
                )
            if cache is not None and cache.known(path, st, meta["sha256"]):
                continue
            if sha256_file(path) != meta["sha256"]:
                raise ArtifactError(
                    f"{self.directory}: checksum of {name} does not match {MANIFEST} "
                    "(the file was modified or damaged; re-export the artifact)"
                )
            if cache is not None:
                cache.remember(path, st, meta["sha256"])
        if cache is not None:
            cache.save()


def user_cache_file(name: str) -> Path:
    """A file in moeport's per-user cache folder ($XDG_CACHE_HOME/moeport, else ~/.cache/moeport)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "moeport" / name


def read_json_or(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def write_json_best_effort(path: Path, data: Any) -> None:
    """Atomically replace ``path`` with ``data`` as JSON; a read-only cache is silently skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass


class _VerifiedCache:
    """sha256s already checked on this machine, keyed by path, size, mtime and inode."""

    def __init__(self) -> None:
        self.path = user_cache_file("verified.json")
        self.entries: dict[str, list] = read_json_or(self.path, {})
        self.dirty = False

    @staticmethod
    def _stamp(st: os.stat_result, sha: str) -> list:
        return [st.st_size, st.st_mtime_ns, st.st_ino, sha]

    def known(self, path: Path, st: os.stat_result, sha: str) -> bool:
        return self.entries.get(str(path.resolve())) == self._stamp(st, sha)

    def remember(self, path: Path, st: os.stat_result, sha: str) -> None:
        self.entries[str(path.resolve())] = self._stamp(st, sha)
        self.dirty = True

    def save(self) -> None:
        if self.dirty:  # a read-only home only costs re-hashing next time
            write_json_best_effort(self.path, self.entries)


def read_artifact(directory: str | Path, verify: bool = True) -> Artifact:
    """Open an artifact directory, refusing unknown formats and (with ``verify``) damaged files."""
    d = Path(directory)
    path = d / MANIFEST
    if not d.is_dir():
        raise ArtifactError(f"artifact directory not found: {d}")
    if not path.is_file():
        raise ArtifactError(f"{d}: not a moeport artifact (no {MANIFEST}); create one with `moeport export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a moeport artifact manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version} is newer than this moeport supports "
            f"({FORMAT_VERSION}); upgrade moeport or re-export with this version"
        )
    if version < FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version} is older than this moeport reads ({FORMAT_VERSION}); "
            "re-export it with `moeport export`"
        )
    artifact = Artifact(d, manifest)
    if verify:
        artifact.verify()
    return artifact
