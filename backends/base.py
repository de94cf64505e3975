"""The backend interface and the registry of installed backends.

A backend turns the backend-neutral artifact into a :class:`Program` that runs one model step.
Backends are found through the ``moeport.backends`` entry-point group, the same way for the
in-tree ones and for third-party packages (``pip install moeport-xyz`` then ``--backend xyz``).
A plugin that fails to import is listed as unavailable with the error; it never breaks moeport.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moeport.exporter.manifest import Artifact

log = logging.getLogger("moeport.backends")

API_VERSION = 1
ENTRY_POINT_GROUP = "moeport.backends"

# In-tree backends, used when moeport runs from a source tree that is not pip-installed
# (no entry points). Installed copies register the same classes through pyproject.toml.
_BUILTIN = {
    "cpu": "moeport.backends.cpu:CpuBackend",
    "tvm": "moeport.backends.tvm:TvmBackend",
    "nvidia": "moeport.backends.nvidia:NvidiaBackend",
    "npu": "moeport.backends.npu:NpuBackend",
    "npu-sim": "moeport.backends.npu:NpuSimBackend",
}


class BackendError(RuntimeError):
    """A backend is unknown, unavailable, or failed to compile/run an artifact."""


def flag(value: Any, name: str, backend: str) -> bool:
    """A boolean compile option, also as given on the command line (``-o quant_kernels=0``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise BackendError(f"{backend}: {name} must be true or false, got {value!r}")


def integer(value: Any, name: str, backend: str, lo: int, hi: int | None = None) -> int:
    """An integer compile option (also as given on the command line), checked against its range."""
    if isinstance(value, bool):
        raise BackendError(f"{backend}: {name} must be a whole number, got {value!r}")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise BackendError(f"{backend}: {name} must be a whole number, got {value!r}") from None
    if number < lo or (hi is not None and number > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise BackendError(f"{backend}: {name} must be {bound}, got {number}")
    return number


# Options every backend accepts (the runtime or the CLI may pass them to any backend).
COMMON_OPTIONS = {
    "threads": "CPU threads (default: every core)",
    "progress": "say on stderr when a long build starts (default true)",
    "trust_compiled": "load compiled native code from the artifact that this machine did not build",
}


def check_options(backend: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Refuse options the backend does not declare (a typo must not be silently ignored); returns the
    options without unset (None) values. A plugin that declares no ``options`` is given everything."""
    name = getattr(backend, "name", "backend")
    given = {k: v for k, v in options.items() if v is not None}
    declared = getattr(backend, "options", None)
    if declared is not None:
        allowed = {**COMMON_OPTIONS, **declared}
        unknown = sorted(k for k in given if k not in allowed)
        if unknown:
            raise BackendError(
                f"{name}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(sorted(allowed))}"
            )
    if "threads" in given:
        given["threads"] = integer(given["threads"], "threads", name, 1, 4096)
    return given


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""


@runtime_checkable
class Program(Protocol):
    """A compiled artifact: runs one step (prefill chunk or decode) of the model."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph: ``feeds`` by input name -> outputs by name (numpy arrays on the host)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A way to execute artifacts on some hardware."""

    name: str
    description: str
    priority: int  # higher is preferred when picking the best available backend
    api_version: int

    def availability(self) -> Availability:
        """Whether this backend can run here, and if not, why (e.g. "no CUDA device")."""
        ...

    def compile(self, artifact: Artifact, options: dict[str, Any]) -> Program:
        """Turn the artifact into something runnable on this backend."""
        ...


@dataclass
class BackendEntry:
    name: str
    target: str
    backend: Backend | None = None
    error: str = ""

    def availability(self) -> Availability:
        if self.backend is None:
            return Availability(False, self.error)
        try:
            return self.backend.availability()
        except Exception as exc:  # a broken plugin is reported, never raised
            return Availability(False, f"availability check failed: {exc!r}")


def _load_entry(name: str, target: str, loader) -> BackendEntry:
    try:
        cls = loader()
        backend = cls() if isinstance(cls, type) else cls
        if getattr(backend, "api_version", None) != API_VERSION:
            return BackendEntry(
                name,
                target,
                None,
                f"plugin speaks backend API {getattr(backend, 'api_version', None)}, moeport needs {API_VERSION}",
            )
        return BackendEntry(name, target, backend)
    except Exception as exc:
        return BackendEntry(name, target, None, f"failed to load plugin {target}: {exc!r}")


def _import_target(target: str):
    module, _, attr = target.partition(":")
    mod = __import__(module, fromlist=[attr])
    return getattr(mod, attr)


def discover() -> dict[str, BackendEntry]:
    """Every registered backend, by name (entry points first, then in-tree fallbacks)."""
    found: dict[str, BackendEntry] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = _load_entry(ep.name, ep.value, ep.load)
    for name, target in _BUILTIN.items():
        if name not in found:
            found[name] = _load_entry(name, target, lambda t=target: _import_target(t))
    return found


def get_backend(name: str) -> Backend:
    """The backend called ``name``, checked to be available here."""
    entries = discover()
    if name not in entries:
        raise BackendError(f"unknown backend {name!r}; registered backends: {', '.join(sorted(entries))}")
    entry = entries[name]
    status = entry.availability()
    if not status.available:
        raise BackendError(f"backend {name!r} is not available: {status.reason}")
    assert entry.backend is not None
    return entry.backend


def best_backend() -> Backend:
    """The highest-priority backend available on this machine."""
    usable = [e.backend for e in discover().values() if e.backend is not None and e.availability().available]
    if not usable:
        raise BackendError("no backend is available (is onnxruntime installed?)")
    return max(usable, key=lambda b: b.priority)
