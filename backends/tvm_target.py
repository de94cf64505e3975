"""TVM targets for the ``tvm`` backend: parsing, the CPU architecture a target builds for, and the C
toolchain that links a library for another architecture (cross-compilation).

TVM 0.27 only accepts targets as dicts (``{"kind": "llvm", "mtriple": ...}``); moeport also takes the
classic string form users know from TVM's docs and MLC, ``llvm -mtriple=aarch64-linux-gnu
-mattr=+neon,+dotprod``, and JSON. Nothing here imports TVM, so runtime-only installs can use it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

_LIST_KEYS = {"mattr", "keys", "libs"}
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64", "i686": "i386", "i586": "i386"}

CROSS_CC_ENV = "MOEPORT_CROSS_CC"
INSTALL_HINT = "pip install 'moeport[cross]' (the ziglang C toolchain), or apt-get install gcc-{arch}-linux-gnu"


class TargetError(ValueError):
    """A target string moeport cannot parse, or no toolchain can link for it."""


def parse_target(text: str) -> dict[str, Any]:
    """``llvm -mtriple=T -mattr=+a,+b -mcpu=C`` or JSON -> TVM's target dict."""
    text = text.strip()
    if text.startswith("{"):
        try:
            target = json.loads(text)
        except ValueError as exc:
            raise TargetError(f"target {text!r} is not valid JSON: {exc}") from exc
        if not isinstance(target, dict) or "kind" not in target:
            raise TargetError(f'target {text!r}: a JSON target needs a "kind"')
        return target
    words = text.split()
    if not words or words[0].startswith("-"):
        raise TargetError(f"target {text!r}: expected a kind first, e.g. 'llvm' or 'llvm -mtriple=aarch64-linux-gnu'")
    target: dict[str, Any] = {"kind": words[0]}
    for word in words[1:]:
        key, sep, value = word.lstrip("-").partition("=")
        if not word.startswith("-") or not key:
            raise TargetError(f"target {text!r}: expected -key=value options after the kind, got {word!r}")
        if not sep:
            target[key] = True
        elif key in _LIST_KEYS:
            target[key] = [v for v in value.split(",") if v]
        else:
            target[key] = int(value) if value.isdigit() else value
    return target


def canonical(target: dict[str, Any]) -> str:
    return json.dumps(target, sort_keys=True)


def normalize_arch(arch: str) -> str:
    return _ARCH_ALIASES.get(arch.lower(), arch.lower())


def host_arch() -> str:
    return normalize_arch(platform.machine())


def target_arch(target: dict[str, Any]) -> str:
    """The CPU architecture the library will contain code for (the triple's first part; else this host)."""
    triple = target.get("mtriple")
    return normalize_arch(str(triple).split("-")[0]) if triple else host_arch()


def is_cross(target: dict[str, Any]) -> bool:
    return target.get("kind") == "llvm" and target_arch(target) != host_arch()


def _plain_triple(triple: str) -> str:
    """aarch64-unknown-linux-gnu -> aarch64-linux-gnu (the form gcc cross packages and zig use)."""
    parts = triple.split("-")
    if len(parts) == 4 and parts[1] in ("unknown", "pc", "none"):
        parts.pop(1)
    return "-".join(parts)


def cross_linker(target: dict[str, Any]) -> tuple[str, Callable[..., None]]:
    """(description, fcompile for ``export_library``) linking a shared library for ``target``'s triple.

    Picked in order: ``$MOEPORT_CROSS_CC`` (a command, e.g. a vendor SDK's gcc with its --sysroot),
    ``<triple>-gcc`` on PATH (Debian/Ubuntu ``gcc-aarch64-linux-gnu``), the ``ziglang`` package.
    """
    triple = _plain_triple(str(target["mtriple"]))
    if os.environ.get(CROSS_CC_ENV):
        cmd = shlex.split(os.environ[CROSS_CC_ENV])
        what = f"${CROSS_CC_ENV} ({cmd[0]})"
    elif shutil.which(f"{triple}-gcc"):
        cmd = [shutil.which(f"{triple}-gcc") or ""]
        what = f"{triple}-gcc"
    elif importlib.util.find_spec("ziglang") is not None:
        cmd = [sys.executable, "-m", "ziglang", "cc", "-target", triple]
        what = f"zig cc -target {triple} (ziglang)"
    else:
        raise TargetError(
            f"no C cross-compiler to link a library for {triple}: {INSTALL_HINT.format(arch=target_arch(target))}, "
            f"or set {CROSS_CC_ENV} to a compiler command"
        )

    def fcompile(output: str, objects: list[str], options: list[str] | None = None) -> None:
        full = [*cmd, "-shared", "-fPIC", "-o", output, *objects, *(options or [])]
        proc = subprocess.run(full, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TargetError(f"linking with {what} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")

    fcompile.output_format = "so"  # type: ignore[attr-defined]
    return what, fcompile


def elf_machine(path: str | os.PathLike) -> int | None:
    """The ELF e_machine of a shared library (62 x86-64, 183 AArch64), or None if it is not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
