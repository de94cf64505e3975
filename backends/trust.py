"""When compiled code found in an artifact's ``compiled/`` folder may be loaded.

A compiled library is native code: loading it runs it. Whoever ships an artifact also ships its
manifest, so a checksum in the manifest proves nothing about who built the code. A library is loaded
only if one of these holds:

1. **this machine built it**: its sha256 is in the per-user record of libraries built here
   (``$XDG_CACHE_HOME/moeport/trusted-libraries.json``, outside every artifact);
2. **it is signed by a key the user trusts**: ``lib.so.sig`` beside it holds an Ed25519 signature of
   its sha256 (``moeport compile --sign-key KEY``), by a key listed in the trusted-keys file
   (``$MOEPORT_TRUSTED_KEYS``, else ``$XDG_CONFIG_HOME/moeport/trusted_keys``: OpenSSH public keys, one
   per line, as in ``authorized_keys``). Checking signatures needs the ``cryptography`` package
   (``pip install 'moeport[sign]'``);
3. **the user said so** for this run (``--trust-compiled`` / ``trust_compiled=True``).

The library is hashed from a descriptor opened through the path resolver and then loaded from that
same descriptor (``/proc/self/fd``), so the bytes that were checked are the bytes that run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeport.exporter.manifest import (
    MANIFEST,
    Artifact,
    OpenedFile,
    read_json_or,
    sha256_fd,
    user_cache_file,
    write_json_best_effort,
)
from moeport.models.paths import UnsafePathError, open_inside, read_inside

from .base import BackendError

BUILT_HERE = "trusted-libraries.json"
KEYS_ENV = "MOEPORT_TRUSTED_KEYS"
SIGNATURE_SUFFIX = ".sig"
SIGNATURE_FORMAT = "moeport-signature-v1"
_CONTEXT = b"moeport compiled library v1\n"  # signatures cover this prefix + the library's sha256
MAX_SIGNATURE_BYTES = 64 << 10


@dataclass(frozen=True)
class Decision:
    """Whether a compiled file may be used, and why (shown by ``moeport inspect`` and in refusals)."""

    allowed: bool
    reason: str


def built_here_record() -> Path:
    return user_cache_file(BUILT_HERE)


def built_here(sha: str) -> bool:
    record = read_json_or(built_here_record(), [])
    return isinstance(record, list) and sha in record


def record_built(sha: str) -> None:
    """Remember that this machine built the library with this sha256 (a read-only cache only costs a
    rebuild next time)."""
    record = read_json_or(built_here_record(), [])
    record = record if isinstance(record, list) else []
    if sha not in record:
        write_json_best_effort(built_here_record(), sorted({*record, sha}))


def trusted_keys_file() -> Path:
    if os.environ.get(KEYS_ENV):
        return Path(os.environ[KEYS_ENV])
    root = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return root / "moeport" / "trusted_keys"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise BackendError(
            f"signed libraries need the cryptography package (pip install 'moeport[sign]'): {exc}"
        ) from exc
    return serialization, ed25519, InvalidSignature


def fingerprint(public_key: Any) -> str:
    """OpenSSH-style fingerprint (``SHA256:...``) of an Ed25519 public key."""
    serialization, _, _ = _crypto()
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def trusted_keys() -> dict[str, Any]:
    """The user's trusted Ed25519 keys by fingerprint (lines that are not Ed25519 OpenSSH keys are skipped)."""
    path = trusted_keys_file()
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    serialization, ed25519, _ = _crypto()
    keys = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = serialization.load_ssh_public_key(" ".join(line.split()[:2]).encode())
        except (ValueError, TypeError, IndexError):
            continue
        if isinstance(key, ed25519.Ed25519PublicKey):
            keys[fingerprint(key)] = key
    return keys


def load_signing_key(path: Path) -> Any:
    """An Ed25519 private key from an OpenSSH (``ssh-keygen -t ed25519``) or PEM file, unencrypted."""
    serialization, ed25519, _ = _crypto()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BackendError(f"cannot read signing key {path}: {exc.strerror}") from exc
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BackendError(f"{path}: not an unencrypted Ed25519 private key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BackendError(f"{path}: the signing key must be Ed25519 (ssh-keygen -t ed25519), got {type(key).__name__}")
    return key


def sign(lib: Path, sha: str, key_path: Path) -> Path:
    """Write ``lib.so.sig``: an Ed25519 signature of the library's sha256 with the key at ``key_path``."""
    key = load_signing_key(key_path)
    signature = key.sign(_CONTEXT + sha.encode())
    out = lib.with_name(lib.name + SIGNATURE_SUFFIX)
    doc = {
        "format": SIGNATURE_FORMAT,
        "algorithm": "ed25519",
        "key": fingerprint(key.public_key()),
        "sha256": sha,
        "signature": base64.b64encode(signature).decode(),
    }
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)
    return out


def signature_of(directory: Path, rel: str, sha: str) -> tuple[str | None, str]:
    """(fingerprint of the trusted key that signed ``rel`` with content ``sha``, or None; what was found)."""
    try:
        raw = read_inside(directory, rel + SIGNATURE_SUFFIX, "signature", MAX_SIGNATURE_BYTES)
    except FileNotFoundError:
        return None, "not signed"
    except UnsafePathError as exc:
        return None, f"signature refused ({exc})"
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT or doc.get("algorithm") != "ed25519":
            return None, "signature file of an unknown format"
        key_id, signature = str(doc["key"]), base64.b64decode(str(doc["signature"]), validate=True)
    except (ValueError, KeyError, TypeError, RecursionError):
        return None, "unreadable signature file"
    if doc.get("sha256") != sha:
        return None, "signed, but for other content (the library was modified)"
    keys = trusted_keys()
    key = keys.get(key_id)
    if key is None:
        return None, f"signed by key {key_id}, which is not in {trusted_keys_file()}"
    _, _, invalid = _crypto()
    try:
        key.verify(signature, _CONTEXT + sha.encode())
    except invalid:
        return None, f"the signature by {key_id} does not verify"
    return key_id, f"signed by trusted key {key_id}"


def decide(artifact: Artifact, rel: str, sha: str, trust_compiled: bool = False) -> Decision:
    """Whether the compiled library ``rel`` (relative to the artifact) with content ``sha`` may be loaded."""
    listed = artifact.manifest.get("compiled", {}).get(rel)
    if isinstance(listed, dict) and listed.get("sha256") != sha:
        return Decision(False, f"its sha256 does not match the one {MANIFEST} lists (modified or damaged)")
    if built_here(sha):
        return Decision(True, "built on this machine")
    try:
        key, found = signature_of(artifact.directory, rel, sha)
    except BackendError as exc:  # no cryptography package: a signature cannot be checked
        key, found = None, str(exc)
    if key is not None:
        return Decision(True, found)
    if trust_compiled:
        return Decision(True, f"trusted for this run (--trust-compiled; {found})")
    return Decision(
        False,
        f"it was not built on this machine and is {found}: native code from an artifact runs only if this machine "
        "built it, a key you trust signed it (moeport compile --sign-key; trusted keys in "
        f"{trusted_keys_file()}), or you pass --trust-compiled",
    )


def open_compiled(artifact: Artifact, rel: str) -> OpenedFile:
    """Open ``rel`` under the artifact through the path resolver and hash it (the caller closes ``fd``)."""
    try:
        fd, st = open_inside(artifact.directory, rel, "compiled file")
    except UnsafePathError as exc:
        raise BackendError(f"refusing {artifact.directory / rel}: {exc}") from exc
    return OpenedFile(rel, artifact.directory / rel, fd, st, sha256_fd(fd, st.st_size))


def load_native(opened: OpenedFile, loader: Callable[[str], Any]) -> Any:
    """Call ``loader(path)`` (e.g. ``tvm.runtime.load_module``) on a path that names the already-opened,
    already-hashed file itself: a private symlink to ``/proc/self/fd/N``, so a file swapped in after the
    check is never what gets loaded."""
    proc = f"/proc/self/fd/{opened.fd}"
    if not os.path.exists(proc):  # no /proc: load a private copy of the checked bytes instead
        private = Path(tempfile.mkdtemp(prefix="moeport-lib-"))
        try:
            path = private / Path(opened.name).name
            with open(path, "wb") as f:
                f.write(opened.read())
            return loader(str(path))
        finally:
            shutil.rmtree(private, ignore_errors=True)
    private = Path(tempfile.mkdtemp(prefix="moeport-lib-"))
    try:
        link = private / Path(opened.name).name
        os.symlink(proc, link)
        return loader(str(link))
    finally:
        shutil.rmtree(private, ignore_errors=True)


def compiled_inventory(artifact: Artifact) -> list[tuple[str, int, Decision]]:
    """Every native library under the artifact's ``compiled/`` (found on disk or listed in the manifest),
    its size and whether a load would use it, and why (``moeport inspect`` prints this)."""
    root = artifact.directory / "compiled"
    names = set(artifact.manifest.get("compiled", {}))
    if root.is_dir() and not root.is_symlink():
        names |= {p.relative_to(artifact.directory).as_posix() for p in root.glob("*/*.so")}
    out = []
    for rel in sorted(names):
        try:
            opened = open_compiled(artifact, rel)
        except FileNotFoundError:
            out.append((rel, 0, Decision(False, f"listed in {MANIFEST} but missing")))
            continue
        except BackendError as exc:
            out.append((rel, 0, Decision(False, str(exc))))
            continue
        try:
            out.append((rel, opened.stat.st_size, decide(artifact, rel, opened.sha256)))
        finally:
            os.close(opened.fd)
    return out
