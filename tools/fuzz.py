"""Fuzz moeport with malformed inputs and count every answer that is not a clean refusal.

    python tools/fuzz.py --minutes N [--target NAME]... [--case-timeout S] [--seed S] [--list]

A *target* is a hypothesis strategy that describes an input, a function that writes the input into a
fresh directory and hands it to moeport, and the exception types that count as a clean refusal (the
project's error classes). For every case the harness records:

- a **crash**: any other exception (its type, message and innermost frame);
- a **hang**: the case ran longer than the per-case limit;
- a **read outside**: an ``open`` of a path whose real path is outside the case directory, seen by an
  audit hook (``sys.addaudithook``, event ``open``), whether or not moeport then refused the input.

Each target runs for its share of the minutes (or ``max_examples`` cases) and reports cases, refusals,
acceptances and failures with the first example of each. The exit status is 1 if anything failed.

Adding a target::

    @target("manifest", st.deferred(lambda: manifest_cases()))
    def fuzz_manifest(case, directory: Path) -> None:
        ...write case into directory, then call moeport on it...
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib.machinery import all_suffixes
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from moeport.models.config import CONFIG_BOUNDS, ROPE_BOUNDS, DeepseekConfig, RopeConfig

# -- the registry ----------------------------------------------------------------------------------


def project_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "moeport refused this input with a clear message"."""
    import click

    from moeport.backends import BackendError
    from moeport.exporter import ArtifactError
    from moeport.models import CheckpointError, ConfigError
    from moeport.runtime.generate import GenerationError
    from moeport.runtime.sampling import SamplingError
    from moeport.runtime.text import TextError

    errors = (CheckpointError, ConfigError, ArtifactError, BackendError, GenerationError, SamplingError, TextError)
    return (*errors, click.UsageError)


@dataclass(frozen=True)
class Target:
    """One kind of input: how to make it, how to feed it to moeport, and what a clean refusal is."""

    name: str
    strategy: st.SearchStrategy
    run: Callable[[Any, Path], None]
    refusals: Callable[[], tuple[type[BaseException], ...]] = project_errors
    setup: Callable[[], object] | None = None  # builds shared inputs before any case is watched


TARGETS: dict[str, Target] = {}


def target(
    name: str,
    strategy: st.SearchStrategy,
    refusals: Callable[[], tuple[type[BaseException], ...]] = project_errors,
    setup: Callable[[], object] | None = None,
) -> Callable[[Callable[[Any, Path], None]], Callable[[Any, Path], None]]:
    """Register ``run(case, directory)`` as the fuzz target ``name``. ``run`` writes the case into the
    empty ``directory`` (the only place it may be read from) and feeds it to moeport; ``strategy``
    draws cases; ``setup`` prepares the valid inputs that cases are made from (read before watching
    starts); ``refusals`` returns the exception types that are a clean refusal."""

    def register(run: Callable[[Any, Path], None]) -> Callable[[Any, Path], None]:
        if name in TARGETS:
            raise ValueError(f"fuzz target {name!r} is registered twice")
        TARGETS[name] = Target(name, strategy, run, refusals, setup)
        return run

    return register


# -- running cases ---------------------------------------------------------------------------------


@dataclass
class Failure:
    kind: str  # "crash" | "hang" | "read outside"
    what: str  # exception type, message and where; or the path read
    example: str  # the case, as hypothesis drew it (truncated)


@dataclass
class Report:
    target: str
    cases: int = 0
    refused: int = 0
    accepted: int = 0
    crashes: int = 0
    hangs: int = 0
    reads_outside: int = 0
    first: dict[str, Failure] = field(default_factory=dict)  # one example per distinct failure

    @property
    def failed(self) -> bool:
        return bool(self.crashes or self.hangs or self.reads_outside)

    def record(self, key: str, failure: Failure) -> None:
        self.first.setdefault(key, failure)

    def summary(self) -> str:
        lines = [
            f"{self.target}: {self.cases} cases ({self.refused} refused, {self.accepted} accepted), "
            f"{self.crashes} crashes, {self.hangs} hangs, {self.reads_outside} reads outside"
        ]
        for failure in self.first.values():
            lines.append(f"  {failure.kind}: {failure.what}")
            lines.append(f"    first example: {failure.example}")
        return "\n".join(lines)


_SYSTEM_FILES = {"/etc/os-release", "/usr/lib/os-release"}


class _OpenWatch:
    """An audit hook that, while armed with directories, records every open of a path outside them.

    Loading Python code (a lazy import) is not a read of input and is not recorded."""

    def __init__(self) -> None:
        self.roots: tuple[str, ...] = ()
        self.outside: list[str] = []
        self._code = tuple(all_suffixes()) + (".pyc",)
        self._installed = False

    @staticmethod
    def _import_paths() -> set[str]:
        return {os.path.realpath(p) for p in sys.path if p}

    def arm(self, *directories: Path) -> None:
        if not self._installed:
            sys.addaudithook(self._hook)  # cannot be removed; costs one check per event while disarmed
            self._installed = True
        self.outside = []
        self.roots = tuple(os.path.realpath(d) for d in directories)

    def disarm(self) -> list[str]:
        self.roots = ()
        return self.outside

    def _hook(self, event: str, args: tuple) -> None:
        roots = self.roots
        if not roots or event != "open" or not args:
            return
        path = args[0]
        if path is None or isinstance(path, int):
            return  # an already open descriptor
        real = os.path.realpath(os.fsdecode(path))
        if real.endswith(self._code) or any(real == r or real.startswith(r + os.sep) for r in roots):
            return
        if real in _SYSTEM_FILES:
            return  # fixed system facts some libraries read once (not a path any input can choose)
        if ".dist-info" + os.sep in real or ".egg-info" + os.sep in real or real in self._import_paths():
            return  # installed packages' metadata (the backend registry's entry points), import probes
        self.outside.append(real)


_WATCH = _OpenWatch()


def reads_only_from(*directories: Path) -> None:
    """Narrow, for the rest of the current case, where opens are allowed: a target calls this once it
    has laid out its input, when moeport should read only part of the case directory."""
    if _WATCH.roots:
        _WATCH.roots = tuple(os.path.realpath(d) for d in directories)


class _CaseTimeout(BaseException):
    """Raised in a case that runs past its limit (a BaseException, so no ``except Exception`` eats it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _CaseTimeout


def _run_case(t: Target, case: Any, directory: Path, report: Report, limit: float) -> None:
    report.cases += 1
    refusals = t.refusals()
    alarm = threading.current_thread() is threading.main_thread()
    if alarm:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
    _WATCH.arm(directory)
    start = time.monotonic()
    hung = False
    try:
        t.run(case, directory)
        report.accepted += 1
    except _CaseTimeout:
        hung = True
    except refusals:
        report.refused += 1
    except Exception as exc:  # noqa: BLE001 - anything else is what the fuzzer looks for
        report.crashes += 1
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{frame.filename}:{frame.lineno} in {frame.name}"
        report.record(
            f"crash {type(exc).__name__} {frame.filename}:{frame.lineno}",
            Failure("crash", f"{type(exc).__name__}: {str(exc)[:300]} ({where})", _show(case)),
        )
    finally:
        elapsed = time.monotonic() - start
        outside = _WATCH.disarm()
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if hung or elapsed > limit:
        report.hangs += 1
        report.record("hang", Failure("hang", f"ran {elapsed:.1f} s, limit {limit:g} s", _show(case)))
    if outside:
        report.reads_outside += 1
        path = outside[0].replace(os.path.realpath(directory), "<case directory>")
        report.record(f"outside {path}", Failure("read outside", f"opened {path}", _show(case)))


def _show(case: Any, limit: int = 600) -> str:
    text = repr(case)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def fuzz(
    t: Target,
    *,
    seconds: float | None = None,
    max_examples: int | None = None,
    case_timeout: float = 10.0,
    seed: int | None = None,
) -> Report:
    """Run target ``t`` for ``seconds`` or ``max_examples`` cases (whichever is given) and report."""
    if (seconds is None) == (max_examples is None):
        raise ValueError("give exactly one of seconds and max_examples")
    report = Report(t.name)
    rng = random.Random(seed)
    if t.setup is not None:
        t.setup()
    deadline = None if seconds is None else time.monotonic() + seconds
    work = Path(tempfile.mkdtemp(prefix=f"moeport-fuzz-{t.name}-"))

    def one_case(case: Any) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            return
        directory = Path(tempfile.mkdtemp(dir=work))
        try:
            _run_case(t, case, directory, report, case_timeout)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    try:
        while True:
            batch = max_examples if max_examples is not None else 100
            run = settings(
                max_examples=batch,
                deadline=None,
                database=None,
                phases=(Phase.generate,),
                suppress_health_check=list(HealthCheck),
                verbosity=Verbosity.quiet,
            )(given(t.strategy)(one_case))
            hypothesis_seed(rng.getrandbits(64))(run)()
            if deadline is None or time.monotonic() >= deadline:
                return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- shared inputs ---------------------------------------------------------------------------------


@functools.cache
def _base() -> Path:
    """A private directory for the valid inputs that cases are mutated from."""
    base = Path(tempfile.mkdtemp(prefix="moeport-fuzz-base-"))
    atexit.register(shutil.rmtree, base, True)
    return base


@functools.cache
def tiny_checkpoint() -> Path:
    """The ``tiny`` preset checkpoint (config.json + model.safetensors), made once per process."""
    from moeport.tools.checkpoints import make_checkpoint

    return make_checkpoint(_base() / "tiny", "tiny", seed=0)


@functools.cache
def tiny_config():
    from moeport.models import load_config

    return load_config(tiny_checkpoint())


@functools.cache
def tiny_header() -> tuple[list[tuple[str, Any]], bytes]:
    """The tiny checkpoint's safetensors header as (name, entry) pairs, and its data bytes."""
    blob = (tiny_checkpoint() / "model.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return list(json.loads(blob[8 : 8 + n]).items()), blob[8 + n :]


def _check_everything(directory: Path) -> None:
    """What an export does with a checkpoint before building the graph: index it, compare it with the
    config, and map every tensor (reading its bytes)."""
    from moeport.exporter.export import check_checkpoint
    from moeport.models import Checkpoint

    with Checkpoint(directory) as ckpt:
        for name in ckpt.names():
            ckpt.raw(name).tobytes()
        check_checkpoint(tiny_config(), ckpt)
        for name in ckpt.names():
            ckpt.read(name, tiny_config().fp8_block_size)


SPECIAL_INTS = st.sampled_from(
    [0, 1, -1, 2, 7, 64, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63), 10**400]
)
INTS = st.one_of(SPECIAL_INTS, st.integers())
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(["F32", "BF16", "F8_E4M3", "I64", "U8", "0", "64", "8", "1e3", "NaN", "yarn", "fp8"]),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
INDEX = st.integers(0, 10**6)  # taken modulo the number of items when applied


def _nested(depth: int, opener: str) -> str:
    if opener == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


# -- target: safetensors headers -------------------------------------------------------------------

_HEADER_OPS = st.one_of(
    st.tuples(st.just("set"), INDEX, st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), JUNK),
    st.tuples(st.just("dim"), INDEX, INDEX, INTS | SCALARS),
    st.tuples(st.just("offset"), INDEX, st.integers(0, 1), INTS | SCALARS),
    st.tuples(st.just("shift"), INDEX, st.integers(-4096, 4096)),
    st.tuples(st.just("entry"), INDEX, JUNK),
    st.tuples(st.just("delete"), INDEX, st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("drop"), INDEX),
    st.tuples(st.just("duplicate"), INDEX, INDEX),
    st.tuples(st.just("alias"), INDEX, INDEX),
    st.tuples(st.just("swap"), INDEX, INDEX),
    st.tuples(st.just("metadata"), JUNK | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)),
    st.tuples(st.just("rename"), INDEX, st.text(max_size=12)),
    st.tuples(st.just("dtype"), INDEX, st.sampled_from(["F64", "F16", "BF16", "F8_E4M3", "I8", "BOOL", "U64", "X"])),
)
_TAILS = st.one_of(
    st.just(("keep",)),
    st.tuples(st.just("truncate"), st.integers(0, 4096)),
    st.tuples(st.just("append"), st.binary(max_size=64)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
)
SAFETENSORS_CASES = st.one_of(
    st.tuples(st.just("structured"), st.lists(_HEADER_OPS, min_size=1, max_size=4), _TAILS),
    st.tuples(st.just("file-bytes"), st.binary(max_size=512)),
    st.tuples(st.just("header-bytes"), st.binary(max_size=512)),
    st.tuples(st.just("header-text"), st.text(max_size=200)),
    st.tuples(st.just("nested"), st.integers(1, 200_000), st.sampled_from(["[", "{"]), st.booleans()),
)


def _apply_header_op(pairs: list[list[Any]], op: tuple) -> None:
    kind, n = op[0], len(pairs)

    def entry(i: int) -> Any:
        return pairs[i % n][1] if n else None

    if kind == "metadata":
        pairs.insert(0, ["__metadata__", op[1]])
    elif not n:
        return
    elif kind == "set" and isinstance(entry(op[1]), dict):
        entry(op[1])[op[2]] = op[3]
    elif kind == "dim" and isinstance(entry(op[1]), dict) and isinstance(entry(op[1]).get("shape"), list):
        shape = entry(op[1])["shape"]
        if shape:
            shape[op[2] % len(shape)] = op[3]
    elif kind == "offset" and isinstance(entry(op[1]), dict) and isinstance(entry(op[1]).get("data_offsets"), list):
        offsets = entry(op[1])["data_offsets"]
        if len(offsets) == 2:
            offsets[op[2]] = op[3]
    elif kind == "shift" and isinstance(entry(op[1]), dict) and isinstance(entry(op[1]).get("data_offsets"), list):
        entry(op[1])["data_offsets"] = [o + op[2] if isinstance(o, int) else o for o in entry(op[1])["data_offsets"]]
    elif kind == "entry":
        pairs[op[1] % n][1] = op[2]
    elif kind == "delete" and isinstance(entry(op[1]), dict):
        entry(op[1]).pop(op[2], None)
    elif kind == "drop":
        del pairs[op[1] % n]
    elif kind == "duplicate":
        pairs.append([pairs[op[1] % n][0], json.loads(json.dumps(entry(op[2])))])
    elif kind == "alias" and isinstance(entry(op[1]), dict) and isinstance(entry(op[2]), dict):
        entry(op[1])["data_offsets"] = json.loads(json.dumps(entry(op[2]).get("data_offsets")))
    elif kind == "swap":
        a, b = op[1] % n, op[2] % n
        pairs[a][1], pairs[b][1] = pairs[b][1], pairs[a][1]
    elif kind == "rename":
        pairs[op[1] % n][0] = op[2]
    elif kind == "dtype" and isinstance(entry(op[1]), dict):
        entry(op[1])["dtype"] = op[2]


def safetensors_bytes(case: tuple) -> bytes:
    """The file a safetensors case describes."""
    pairs, data = tiny_header()
    kind = case[0]
    if kind == "file-bytes":
        return case[1]
    if kind == "header-bytes":
        return len(case[1]).to_bytes(8, "little") + case[1] + data
    if kind == "header-text":
        header = case[1].encode("utf-8", "surrogatepass")
    elif kind == "nested":
        inner = _nested(case[1], case[2])
        header = (('{"__metadata__":' + inner + "}") if case[3] else inner).encode()
    else:
        mutable = json.loads(json.dumps([[k, v] for k, v in pairs]))
        for op in case[1]:
            _apply_header_op(mutable, op)
        # written by hand so that duplicate names survive
        header = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in mutable) + "}").encode(
            "utf-8", "surrogatepass"
        )
    blob = len(header).to_bytes(8, "little") + header + data
    if kind == "structured":
        tail = case[2]
        if tail[0] == "truncate":
            blob = blob[: max(0, len(blob) - tail[1])]
        elif tail[0] == "append":
            blob += tail[1]
        elif tail[0] == "length":
            blob = tail[1].to_bytes(8, "little") + blob[8:]
    return blob


@target("safetensors-header", SAFETENSORS_CASES, setup=lambda: (tiny_header(), tiny_config()))
def fuzz_safetensors_header(case: tuple, directory: Path) -> None:
    from safetensors import safe_open

    path = directory / "model.safetensors"
    path.write_bytes(safetensors_bytes(case))
    _check_everything(directory)
    # what moeport accepts, the safetensors library (the format's reference reader) must accept too
    try:
        with safe_open(path, framework="numpy") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - its error types are not part of its API
        raise AssertionError(f"moeport accepted a file the safetensors library refuses ({exc})") from None


# -- target: config.json ---------------------------------------------------------------------------

# every field with a bound, and the other keys parse_config reads
_CONFIG_KEYS = st.sampled_from(
    [*CONFIG_BOUNDS, *"model_type eos_token_id rope_scaling rope_parameters quantization_config auto_map".split()]
)
_ROPE_KEYS = st.sampled_from(list(ROPE_BOUNDS))
CONFIG_VALUES = st.one_of(
    JUNK,
    INTS,
    st.floats(),
    st.from_regex(r"-?[0-9]{1,6}(\.[0-9]{1,3})?", fullmatch=True),
    st.sampled_from([[], {}, [128, 128], [128], [0, 0], 1e-300, 1e300, 0.5, 4096, 256, 255, 8, 2, 1]),
    st.sampled_from("yarn default dynamic deepseek_v2 deepseek_v3 sigmoid softmax greedy noaux_tc silu fp8".split()),
)
_CONFIG_OPS = st.one_of(
    st.tuples(st.just("set"), _CONFIG_KEYS | st.text(max_size=8), CONFIG_VALUES),
    st.tuples(st.just("delete"), _CONFIG_KEYS),
    st.tuples(st.just("rope"), _ROPE_KEYS, CONFIG_VALUES),
    st.tuples(st.just("quant"), st.sampled_from(["quant_method", "weight_block_size", "fmt"]), CONFIG_VALUES),
)
CONFIG_CASES = st.one_of(
    st.tuples(st.just("ops"), st.lists(_CONFIG_OPS, min_size=1, max_size=5)),
    st.tuples(st.just("json"), JUNK),
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    st.tuples(st.just("nested"), st.integers(1, 200_000), st.sampled_from(["[", "{"])),
)


def config_bytes(case: tuple) -> bytes:
    """The config.json a config case describes (mutations of the tiny preset's)."""
    from moeport.tools.checkpoints import PRESETS

    kind = case[0]
    if kind == "bytes":
        return case[1]
    if kind == "nested":
        return ('{"model_type": "deepseek_v3", "x": ' + _nested(case[1], case[2]) + "}").encode()
    if kind == "json":
        return json.dumps(case[1]).encode("utf-8", "surrogatepass")
    cfg = json.loads(json.dumps(PRESETS["tiny"]))
    for op in case[1]:
        if op[0] == "set":
            cfg[op[1]] = op[2]
        elif op[0] == "delete":
            cfg.pop(op[1], None)
        elif op[0] == "rope":
            if not isinstance(cfg.get("rope_scaling"), dict):
                cfg["rope_scaling"] = {}
            cfg["rope_scaling"][op[1]] = op[2]
        elif op[0] == "quant":
            if not isinstance(cfg.get("quantization_config"), dict):
                cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
            cfg["quantization_config"][op[1]] = op[2]
    return json.dumps(cfg).encode("utf-8", "surrogatepass")


def _use_config(cfg: Any) -> None:
    """What export and load derive from a config, and the manifest round trip (which must not fail)."""
    from moeport.models.config import DeepseekConfig
    from moeport.models.deepseek import rope_inv_freq

    stored = json.loads(json.dumps(cfg.to_dict()))
    again = DeepseekConfig.from_dict(stored)
    if again != cfg:
        raise AssertionError(f"config changed in the manifest round trip: {again} != {cfg}")
    inv_freq, _ = rope_inv_freq(cfg)
    cfg.softmax_scale()
    if len(inv_freq) != cfg.qk_rope_head_dim // 2:
        raise AssertionError(f"{len(inv_freq)} rope frequencies for qk_rope_head_dim {cfg.qk_rope_head_dim}")


@target("config-json", CONFIG_CASES, setup=tiny_config)
def fuzz_config_json(case: tuple, directory: Path) -> None:
    from moeport.models import load_config

    (directory / "config.json").write_bytes(config_bytes(case))
    _use_config(load_config(directory))


# -- target: a config stored in an artifact's manifest ---------------------------------------------

_STORED_KEYS = st.sampled_from([*(f.name for f in fields(DeepseekConfig)), "unknown"])
_STORED_ROPE_KEYS = st.sampled_from([*(f.name for f in fields(RopeConfig)), "unknown"])
STORED_CASES = st.lists(
    st.one_of(
        st.tuples(st.just("set"), _STORED_KEYS, CONFIG_VALUES),
        st.tuples(st.just("delete"), _STORED_KEYS),
        st.tuples(st.just("rope"), _STORED_ROPE_KEYS, CONFIG_VALUES),
    ),
    min_size=1,
    max_size=4,
)


@target("stored-config", STORED_CASES, setup=tiny_config)
def fuzz_stored_config(case: list, directory: Path) -> None:
    from moeport.models.config import DeepseekConfig

    stored = json.loads(json.dumps(tiny_config().to_dict()))
    for op in case:
        if op[0] == "set":
            stored[op[1]] = op[2]
        elif op[0] == "delete":
            stored.pop(op[1], None)
        elif isinstance(stored.get("rope"), dict):
            stored["rope"][op[1]] = op[2]
    _use_config(DeepseekConfig.from_dict(json.loads(json.dumps(stored))))


# -- target: shard indexes -------------------------------------------------------------------------

_OUTSIDE = "<outside>"  # replaced by the absolute path of a valid shard outside the case directory
_SHARD_COUNT = 3


@functools.cache
def tiny_shards() -> tuple[Path, dict[str, str]]:
    """The tiny checkpoint split into shards with an index (in a folder of its own), and its weight map."""
    from moeport.models import Checkpoint
    from moeport.tools.checkpoints import write_safetensors

    folder = _base() / "sharded"
    folder.mkdir()
    with Checkpoint(tiny_checkpoint()) as ckpt:
        names = ckpt.names()
        weight_map = {}
        for k in range(_SHARD_COUNT):
            shard = f"model-{k + 1:05d}-of-{_SHARD_COUNT:05d}.safetensors"
            part = names[k::_SHARD_COUNT]
            write_safetensors(folder / shard, {n: ckpt.raw(n) for n in part}, "F32")
            weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(tiny_checkpoint() / "config.json", folder / "config.json")
    return folder, weight_map


def _shard_names() -> list[str]:
    return [f"model-{k + 1:05d}-of-{_SHARD_COUNT:05d}.safetensors" for k in range(_SHARD_COUNT)]


_SHARD_VALUES = st.one_of(
    st.sampled_from(_shard_names()),
    st.sampled_from([_OUTSIDE, "/etc/passwd", "", ".", "..", "a\\b", "x\x00y", "C:/x", "config.json"]),
    st.sampled_from([f"{prefix}{_shard_names()[0]}" for prefix in ("../", "../../", "sub/../", "./", "sub/")]),
    st.sampled_from([f"{name}.safetensors" for name in ("link-out", "link-in", "link-up", "dir", "missing")]),
    st.sampled_from(["../outside.safetensors", "model.safetensors.index.json"]),
    JUNK,
)
_LINK_TARGETS = st.sampled_from([_OUTSIDE, "/etc/passwd", "../outside.safetensors", _shard_names()[1], "nowhere"])
_INDEX_OPS = st.one_of(
    st.tuples(st.just("set"), INDEX, _SHARD_VALUES),
    st.tuples(st.just("drop"), INDEX),
    st.tuples(st.just("add"), st.text(max_size=12), _SHARD_VALUES),
    st.tuples(st.just("weight_map"), JUNK),
    st.tuples(st.just("index"), JUNK),
    st.tuples(
        st.just("link"),
        st.sampled_from([*_shard_names(), "model.safetensors", "model.safetensors.index.json", "config.json"]),
        _LINK_TARGETS,
    ),
    st.tuples(st.just("unindex")),
)
SHARD_CASES = st.tuples(st.sampled_from(["plain", "hub"]), st.lists(_INDEX_OPS, max_size=4))


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no copy: the files are only read
    except OSError:
        shutil.copyfile(src, dst)


def build_sharded_case(case: tuple, directory: Path) -> Path:
    """Lay a shard-index case out in ``directory``; return the checkpoint directory to read."""
    layout, ops = case
    folder, base_map = tiny_shards()
    outside = str(folder / _shard_names()[0])
    files = [*_shard_names(), "config.json"]
    if layout == "hub":  # Hugging Face hub cache: the snapshot's files are symlinks into ../../blobs
        repo = directory / "models--org--tiny"
        (repo / "blobs").mkdir(parents=True)
        ckpt = repo / "snapshots" / "0123abc"
        ckpt.mkdir(parents=True)
        for k, name in enumerate(files):
            _place(folder / name, repo / "blobs" / f"blob{k}")
            (ckpt / name).symlink_to(f"../../blobs/blob{k}")
    else:
        ckpt = directory / "ckpt"
        ckpt.mkdir()
        for name in files:
            _place(folder / name, ckpt / name)
    (ckpt / "dir.safetensors").mkdir()
    (ckpt / "link-out.safetensors").symlink_to(outside)
    (ckpt / "link-in.safetensors").symlink_to(_shard_names()[0])
    (ckpt / "link-up.safetensors").symlink_to("../outside.safetensors")
    _place(folder / _shard_names()[0], ckpt.parent / "outside.safetensors")  # a valid shard just outside

    index: Any = {"metadata": {}, "weight_map": dict(base_map)}
    write_index = True
    for op in ops:
        wm = index.get("weight_map") if isinstance(index, dict) else None
        keys = list(wm) if isinstance(wm, dict) else []
        value = op[-1] if op[0] in ("set", "add") else None
        if value == _OUTSIDE:
            value = outside
        if op[0] == "set" and keys:
            wm[keys[op[1] % len(keys)]] = value
        elif op[0] == "drop" and keys:
            del wm[keys[op[1] % len(keys)]]
        elif op[0] == "add" and isinstance(wm, dict):
            wm[op[1]] = value
        elif op[0] == "weight_map" and isinstance(index, dict):
            index["weight_map"] = op[1]
        elif op[0] == "index":
            index = op[1]
        elif op[0] == "link":
            path = ckpt / op[1]
            if path.is_symlink() or path.exists():
                path.unlink()
            path.symlink_to(outside if op[2] == _OUTSIDE else op[2])
            write_index = write_index and op[1] != "model.safetensors.index.json"
        elif op[0] == "unindex":
            write_index = False
    index_path = ckpt / "model.safetensors.index.json"
    if write_index:
        if index_path.is_symlink():
            index_path.unlink()
        index_path.write_text(json.dumps(index))
    return ckpt


@target("shard-index", SHARD_CASES, setup=lambda: (tiny_shards(), tiny_config()))
def fuzz_shard_index(case: tuple, directory: Path) -> None:
    from moeport.models import load_config

    ckpt = build_sharded_case(case, directory)
    blobs = ckpt.parent.parent / "blobs"
    reads_only_from(ckpt, *([blobs] if blobs.is_dir() else []))
    load_config(ckpt)
    _check_everything(ckpt)


# -- target: artifact manifests ---------------------------------------------------------------------


@functools.cache
def tiny_artifact() -> Path:
    """The tiny checkpoint exported (fp32), once per process; cases copy it."""
    from moeport.exporter import export

    return export(tiny_checkpoint(), _base() / "tiny-artifact")


_MANIFEST_PATHS = st.sampled_from(
    [
        ("format",),
        ("format_version",),
        ("files",),
        ("graph",),
        ("graph", "file"),
        ("graph", "weights_file"),
        ("graph", "opset"),
        ("cache",),
        ("cache", "layers"),
        ("cache", "dim"),
        ("cache", "input"),
        ("cache", "output"),
        ("cache", "kind"),
        ("cache", "dtype"),
        ("weights",),
        ("weights", "dtype"),
        ("weights", "bytes"),
        ("weights", "block_size"),
        ("max_seq_len",),
        ("model",),
        ("model", "config"),
        ("model", "config", "vocab_size"),
        ("model", "config", "num_hidden_layers"),
        ("model", "config", "kv_lora_rank"),
        ("model", "config", "rope"),
        ("compiled",),
    ]
)
_FILE_NAMES = st.sampled_from(
    [
        "model.onnx",
        "model.onnx.data",
        "generation_config.json",
        "../outside.json",
        "/etc/hostname",
        "a/../b",
        "sub/x.json",
        "compiled/tvm-x/lib.so",
        "tokenizer.json",
        "",
        ".",
        "x\\y",
        "link-out.json",
    ]
)
_MANIFEST_OPS = st.one_of(
    st.tuples(st.just("set"), _MANIFEST_PATHS, CONFIG_VALUES),
    st.tuples(st.just("delete"), _MANIFEST_PATHS),
    st.tuples(st.just("file"), _FILE_NAMES, st.one_of(JUNK, st.just("honest"))),
    st.tuples(st.just("unlist"), _FILE_NAMES),
    st.tuples(st.just("side"), st.sampled_from(["generation_config.json", "tokenizer_config.json"]), JUNK),
)
MANIFEST_CASES = st.one_of(
    st.tuples(st.just("ops"), st.lists(_MANIFEST_OPS, min_size=1, max_size=4)),
    st.tuples(st.just("json"), JUNK),
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    st.tuples(st.just("nested"), st.integers(1, 200_000), st.sampled_from(["[", "{"])),
)


def build_manifest_case(case: tuple, directory: Path) -> Path:
    """Copy the tiny artifact into ``directory/art`` and apply the case to its manifest and files."""
    from moeport.exporter.manifest import sha256_file

    art = _link_tree(tiny_artifact(), directory / "art")
    (directory / "outside.json").write_text('{"eos_token_id": 1}')
    (art / "link-out.json").symlink_to(directory / "outside.json")
    path = art / "manifest.json"
    original = path.read_text()
    path.unlink()  # a hard link to the shared copy: write a file of the case's own
    kind = case[0]
    if kind == "bytes":
        path.write_bytes(case[1])
        return art
    if kind == "nested":
        path.write_text('{"format": "moeport-artifact", "format_version": 2, "x": ' + _nested(case[1], case[2]) + "}")
        return art
    if kind == "json":
        path.write_text(json.dumps(case[1]))
        return art
    m = json.loads(original)
    for op in case[1]:
        if op[0] in ("set", "delete"):
            keys, obj = op[1], m
            for k in keys[:-1]:
                obj = obj.get(k) if isinstance(obj, dict) else None
            if not isinstance(obj, dict):
                continue
            if op[0] == "set":
                obj[keys[-1]] = op[2]
            else:
                obj.pop(keys[-1], None)
        elif op[0] == "file" and isinstance(m.get("files"), dict):
            name, value = op[1], op[2]
            if value == "honest":  # an attacker keeps the checksum right
                target = art / name
                if os.path.isfile(target) and not name.startswith("/"):
                    value = {"sha256": sha256_file(target), "size": os.path.getsize(target)}
                else:
                    value = {"sha256": "0" * 64, "size": 2}
            m["files"][name] = value
        elif op[0] == "unlist" and isinstance(m.get("files"), dict):
            m["files"].pop(op[1], None)
        elif op[0] == "side":
            (art / op[1]).unlink(missing_ok=True)
            (art / op[1]).write_text(json.dumps(op[2]))
            if isinstance(m.get("files"), dict):
                m["files"][op[1]] = {"sha256": sha256_file(art / op[1]), "size": (art / op[1]).stat().st_size}
    path.write_text(json.dumps(m))
    return art


@target("manifest", MANIFEST_CASES, setup=tiny_artifact)
def fuzz_manifest(case: tuple, directory: Path) -> None:
    """Read, verify and load an artifact with a mutated manifest (names, values, side files), then run a
    step: a clean refusal or a working model, never anything else."""
    from moeport.backends.cpu import CpuBackend
    from moeport.exporter.manifest import read_artifact
    from moeport.runtime.model import Model

    art = build_manifest_case(case, directory)
    artifact = read_artifact(art, verify=False)
    try:
        artifact.verify(use_cache=False)
        model = Model(artifact, CpuBackend().compile(artifact, {"threads": 1}), "cpu")
        model.session().generate([1, 2], max_new_tokens=2)
    finally:
        artifact.close()


# -- target: command-line flags ------------------------------------------------------------------------


def _link_tree(src: Path, dst: Path) -> Path:
    """``src``'s files hard-linked into ``dst`` (no reads: the shared copy lies outside the case directory)."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    return dst


def _big(text: str, limit: int) -> bool:
    try:
        return abs(int(text)) > limit
    except ValueError:
        return False


class CliRefused(Exception):
    """The CLI stopped with a clean one-line error (exit 1 or 2)."""


_FLAG_VALUES = st.one_of(
    SPECIAL_INTS.map(str),
    st.integers(-5, 300).map(str),
    st.sampled_from(["nan", "inf", "-inf", "-0", "1e309", "0.5", "1.0", "", " ", "abc", "true", "0x10", "１"]),
    st.text(max_size=6),
)
_OPTION_KEYS = st.sampled_from(
    [
        "threads",
        "accuracy_level",
        "reference",
        "half_kernels",
        "quant_kernels",
        "attention_kernels",
        "verify",
        "trust_compiled",
        "progress",
        "bogus",
        "",
        "buckets",
        "target",
    ]
)
_CLI_FLAGS = st.one_of(
    st.tuples(
        st.sampled_from(
            [
                "--max-new-tokens",
                "--temperature",
                "--top-k",
                "--top-p",
                "--min-p",
                "--repetition-penalty",
                "--seed",
                "--stop",
                "--on-context-limit",
                "--threads",
                "--backend",
                "--prompt-ids",
                "--prompt",
                "--system",
                "--buckets",
                "--cache-capacity",
                "--device-id",
                "--npu-dtype",
            ]
        ),
        _FLAG_VALUES,
    ),
    st.tuples(st.just("-o"), st.tuples(_OPTION_KEYS, _FLAG_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}")),
    st.tuples(st.sampled_from(["--ignore-eos", "--json", "--chat", "--trust-compiled", "--bogus-flag"])),
)
CLI_CASES = st.tuples(st.sampled_from(["run", "bench", "inspect"]), st.lists(_CLI_FLAGS, max_size=5))


@target("cli-flags", CLI_CASES, refusals=lambda: (CliRefused,), setup=tiny_artifact)
def fuzz_cli_flags(case: tuple, directory: Path) -> None:
    """``moeport run|bench|inspect`` with random flags: exit 0, or one clean error line (exit 1/2); never a
    traceback, an internal error or a hang. Only the cpu backend (and unknown names) are drawn: the
    compiling backends would write builds into the artifact."""
    from click.testing import CliRunner

    from moeport.tools.cli import main as cli

    command, flags = case
    art = _link_tree(tiny_artifact(), directory / "art")
    args = [command, str(art)]
    if command == "run":
        args += ["--prompt-ids", "1,2,3", "--max-new-tokens", "3"]
    elif command == "bench":
        args += ["--prompt-len", "4", "--new-tokens", "2"]
    for flag in flags:
        if flag[0] == "--backend" and flag[1] not in ("cpu", "auto"):
            args += ["--backend", "nosuch" + flag[1]]
        elif command == "bench" and flag[0] in ("--max-new-tokens", "--prompt-ids", "--prompt", "--stop"):
            continue
        elif flag[0] == "--max-new-tokens" and _big(flag[1], 64):
            args += [flag[0], "64"]  # a long generation is not a finding
        elif "threads" in "".join(flag) and _big(flag[-1].split("=")[-1], 16):
            args += [flag[0], flag[-1].replace(flag[-1].split("=")[-1], "2")]  # hundreds of threads on 2 cores
        else:
            args += list(flag)
    env = {"XDG_CACHE_HOME": str(directory / "cache"), "MOEPORT_TRUSTED_KEYS": str(directory / "keys")}
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=True)
    out = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if "Traceback" in out or "internal error" in out:
        raise AssertionError(f"{args}: {out[-400:]}")
    if result.exit_code in (1, 2):
        errors = [line for line in out.splitlines() if line.startswith("Error")]
        if len(errors) != 1:
            raise AssertionError(f"{args}: exit {result.exit_code} without one Error line: {out[-400:]}")
        raise CliRefused(errors[0])
    if result.exit_code != 0:
        raise AssertionError(f"{args}: exit code {result.exit_code}")


# -- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="total time, shared by the targets (default 1)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="run only this target (repeatable)")
    parser.add_argument("--case-timeout", type=float, default=10.0, help="seconds before a case counts as a hang")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible runs")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(TARGETS)))
        return 0
    if args.minutes <= 0 or args.case_timeout <= 0:
        parser.error("--minutes and --case-timeout must be positive")
    logging.getLogger("moeport").setLevel(logging.ERROR)  # warnings about accepted oddities are not findings
    names = args.target or sorted(TARGETS)
    share = args.minutes * 60 / len(names)
    failed = False
    for name in names:
        report = fuzz(TARGETS[name], seconds=share, case_timeout=args.case_timeout, seed=args.seed)
        print(report.summary(), flush=True)
        failed |= report.failed
    total = "FAILED: crashes, hangs or reads outside above" if failed else "no crashes, hangs or reads outside"
    print(total)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
