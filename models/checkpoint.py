"""Memory-mapped reading of Hugging Face safetensors checkpoints (one file or shards).

The safetensors header is parsed here and tensors are read from the file that was opened and checked,
only when they are used: :meth:`Checkpoint.read` reads any rows of a tensor with ``pread`` (so an
export holds one slice of a tensor at a time, and the file's pages stay in the kernel's page cache
rather than in the process's resident memory), and :meth:`Checkpoint.raw` maps a whole tensor
read-only. (The ``safetensors`` package's numpy interface has no bfloat16 or float8 dtypes, which
DeepSeek releases use.)

Checkpoints come from strangers, so everything in them is validated before it is used, and every
problem is a :class:`CheckpointError` naming the file and the tensor:

- each file is opened through :mod:`moeport.models.paths` (no name or symlink leaves the checkpoint
  directory, except into the ``blobs/`` of a Hugging Face hub-cache snapshot) and read and mapped
  from that descriptor only;
- the header is strict JSON of bounded size and nesting, without duplicate keys; every tensor has a
  known dtype, a shape of non-negative ints and ``data_offsets`` of two non-negative ints whose span
  is exactly ``prod(shape) * itemsize`` bytes; as in the ``safetensors`` library itself, the tensors
  tile the data region from its first byte to the end of the file, so none overlap;
- a shard index's ``weight_map`` is a ``{tensor: shard}`` object that agrees with the shards' headers.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import reprlib
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .paths import UnsafePathError, check_name, hub_blobs, open_inside, read_fd, read_inside

log = logging.getLogger("moeport.models")

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024  # bytes, as in the safetensors library
_MAX_INDEX = 100 * 1024 * 1024  # bytes of model.safetensors.index.json (DeepSeek-V3's is about 9 MB)
_MAX_DEPTH = 8  # JSON nesting: a header needs 3 (object, tensor entry, shape list)
_MAX_DIMS = 32  # numpy's limit is 64; no real weight has more than 4
_MAX_ELEMENTS = 2**48  # per tensor, far above any real weight, far below int64 overflow
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint's weight files are missing, corrupt, or do not match the config."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path  # the checkpoint directory / the file's name in it (what error messages show)
    start: int  # absolute byte offset in the file
    end: int


# -- bounded JSON ----------------------------------------------------------------------------------

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in the JSON text ``data`` (strings are skipped), computed
    without recursion, so that it can be checked before a parser recurses."""
    structure = np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)
    if not structure.size:
        return 0
    step = np.isin(structure, (ord("["), ord("{"))).astype(np.int64)
    step -= np.isin(structure, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short_repr(key)}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_int(text: str) -> int:
    value = int(text)
    float(value)  # OverflowError beyond a double's range, as JSON parsers in other languages refuse it
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {short_repr(text)} is out of range")
    return value


def load_json_bounded(
    data: bytes, max_depth: int = _MAX_DEPTH, allow_nan: bool = False, finite_numbers: bool = False
) -> Any:
    """Parse UTF-8 JSON from an untrusted file: nesting at most ``max_depth`` deep, no duplicate keys,
    (unless ``allow_nan``) no ``NaN``/``Infinity``, and with ``finite_numbers`` no number beyond a double's
    range (as the ``safetensors`` library's own parser). Raises ValueError naming the problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    depth = json_depth(data)
    if depth > max_depth:
        raise ValueError(f"nested {depth} levels deep (at most {max_depth} allowed)")
    numbers = {"parse_int": _finite_int, "parse_float": _finite_float} if finite_numbers else {}
    try:
        return json.loads(
            text, object_pairs_hook=_unique_keys, parse_constant=None if allow_nan else _no_constant, **numbers
        )
    except OverflowError:
        raise ValueError("a number is out of range") from None
    except RecursionError:  # json_depth bounds this; kept as a last line of defence
        raise ValueError("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, constants, ints over 4300 digits
        raise ValueError(str(exc)) from None


# -- safetensors headers ---------------------------------------------------------------------------


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 60, 60


def short_repr(value: Any) -> str:
    """A short repr() of a value read from an untrusted file, in time and size independent of the value's."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int beyond 4300 digits cannot be printed
        return f"<{type(value).__name__} too large to print>"


def _exact_int(value: Any) -> bool:
    return type(value) is int  # bool is a subclass of int; "8" and 8.0 are not ints here


def parse_header(header_bytes: bytes, file_size: int, file: Path) -> list[TensorInfo]:
    """Validate a safetensors header (the JSON after the 8-byte length) of a file of ``file_size``
    bytes; return its tensors in header order. Raises :class:`CheckpointError` naming the problem."""
    where = file.name
    try:
        header = load_json_bounded(header_bytes, finite_numbers=True)
    except ValueError as exc:
        raise CheckpointError(f"{where}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    base = 8 + len(header_bytes)
    data_size = file_size - base
    infos = []
    for name, meta in header.items():
        if name == "__metadata__":
            _check_metadata(meta, where)
            continue
        infos.append(_tensor_info(name, meta, where, file, base))
    _check_layout(infos, data_size, base, where)
    return infos


def _check_metadata(meta: Any, where: str) -> None:
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings, got {short_repr(meta)}")


def _tensor_info(name: str, meta: Any, where: str, file: Path, base: int) -> TensorInfo:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: tensor {name!r:.200}: {problem}")

    if not isinstance(meta, dict):
        raise bad(f"header entry must be an object, got {short_repr(meta)}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        raise bad(f"header entry lacks {', '.join(missing)}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise bad(f"unsupported dtype {short_repr(dtype)} (supported: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        raise bad(f"shape must be a list of at most {_MAX_DIMS} ints, got {short_repr(shape)}")
    if not all(_exact_int(d) and 0 <= d <= _MAX_ELEMENTS for d in shape):
        raise bad(f"shape must hold ints in [0, {_MAX_ELEMENTS}], got {short_repr(shape)}")
    count = math.prod(shape)  # Python ints: no wrap-around
    if count > _MAX_ELEMENTS:
        raise bad(f"shape {shape} has {count} elements, more than {_MAX_ELEMENTS}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_exact_int(o) and o >= 0 for o in offsets)):
        raise bad(f"data_offsets must be two non-negative ints, got {short_repr(offsets)}")
    begin, end = offsets
    if begin > end:
        raise bad(f"data_offsets {offsets} begin after they end")
    nbytes = count * _DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise bad(f"data_offsets {offsets} span {end - begin} bytes, but shape {shape} of {dtype} needs {nbytes}")
    return TensorInfo(name, dtype, tuple(shape), file, base + begin, base + end)


def _check_layout(infos: list[TensorInfo], data_size: int, base: int, where: str) -> None:
    """As the safetensors library requires: sorted by offset, the tensors cover the data region
    exactly, each starting where the previous one ends (no overlap, no gap, nothing after)."""
    at, previous = 0, None
    for info in sorted(infos, key=lambda i: (i.start, i.end)):
        begin, end = info.start - base, info.end - base
        if end > data_size:
            raise CheckpointError(
                f"{where}: truncated (tensor {info.name!r:.200} ends at byte {info.end}, file has {base + data_size})"
            )
        if begin < at:
            raise CheckpointError(
                f"{where}: tensors {previous!r:.200} and {info.name!r:.200} overlap (bytes {begin}..{at} of the data)"
            )
        if begin > at:
            raise CheckpointError(
                f"{where}: {begin - at} unused bytes before tensor {info.name!r:.200} (at {at} of the data); "
                "a safetensors file stores its tensors back to back"
            )
        at, previous = end, info.name
    if at < data_size:
        raise CheckpointError(
            f"{where}: {data_size - at} bytes after the last tensor; the header does not describe the whole file"
        )


def _read_header(fd: int, size: int, file: Path) -> list[TensorInfo]:
    head = read_fd(fd, 8)
    if len(head) < 8:
        raise CheckpointError(f"{file.name}: truncated safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{file.name}: corrupt or truncated safetensors header (header length {n})")
    return parse_header(read_fd(fd, n, 8), size, file)


# -- checkpoint directories ------------------------------------------------------------------------


def _close_all(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class Checkpoint:
    """Index of every tensor in a checkpoint directory; tensors are read lazily (pread, or mmap with :meth:`raw`).

    The weight files stay open (not re-opened by path) until :meth:`close` or garbage collection."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._finalizer = weakref.finalize(self, _close_all, self._fds)
        try:
            self._blobs = [b] if (b := hub_blobs(self.directory)) else []
            names, weight_map = self._weight_files()
            for name in names:
                file = self.directory / name
                fd, st = self._open(name, "weight file")
                self._fds[file] = fd
                for info in _read_header(fd, st.st_size, file):
                    if info.name in self.tensors:
                        raise CheckpointError(
                            f"{name}: tensor {info.name!r} also in {self._name(self.tensors[info.name])}"
                        )
                    self.tensors[info.name] = info
            if weight_map is not None:
                self._check_index(weight_map)
        except BaseException:
            self.close()
            raise
        self.files = [self.directory / n for n in names]

    def close(self) -> None:
        """Close the weight files. Arrays returned by :meth:`raw` stay valid (they hold their own map)."""
        self._finalizer()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, name: str, what: str) -> tuple[int, os.stat_result]:
        try:
            return open_inside(self.directory, name, what, also=self._blobs)
        except UnsafePathError as exc:
            raise CheckpointError(f"{self.directory}: {exc}") from None
        except FileNotFoundError:
            raise CheckpointError(f"{self.directory}: {what} {name!r} is missing") from None
        except OSError as exc:
            raise CheckpointError(f"{self.directory}: cannot open {what} {name!r} ({exc.strerror})") from None

    def _weight_files(self) -> tuple[list[str], dict[str, str] | None]:
        """The weight files' names, and the index's weight map when there is an index."""
        d = self.directory
        if not d.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {d}")
        if os.path.lexists(d / INDEX_FILE):
            weight_map = self._read_index()
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (d / n).is_file()]
            if missing:
                raise CheckpointError(f"{INDEX_FILE} names shard(s) that are missing: {', '.join(missing)}")
            return names, weight_map
        if os.path.lexists(d / SINGLE_FILE):
            return [SINGLE_FILE], None
        shards = sorted(p.name for p in d.glob("*.safetensors"))
        if shards:
            return shards, None
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise CheckpointError(
                f"{d}: only pickle weights found ({', '.join(pickles)}); moeport never loads pickle files "
                "(they can run arbitrary code). Convert them to safetensors first."
            )
        raise CheckpointError(f"{d}: no model.safetensors, shards or model.safetensors.index.json found")

    def _read_index(self) -> dict[str, str]:
        try:
            data = read_inside(self.directory, INDEX_FILE, "shard index", _MAX_INDEX, also=self._blobs)
        except FileNotFoundError:
            raise CheckpointError(f"{self.directory}: shard index {INDEX_FILE!r} is missing") from None
        except UnsafePathError as exc:
            raise CheckpointError(f"{self.directory}: {exc}") from None
        try:
            index = load_json_bounded(data)
        except ValueError as exc:
            raise CheckpointError(f"{INDEX_FILE}: unreadable shard index ({exc})") from None
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            got = type(index.get("weight_map") if isinstance(index, dict) else index).__name__
            raise CheckpointError(f"{INDEX_FILE}: weight_map must be an object of tensor -> shard name, got {got}")
        weight_map = index["weight_map"]
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise CheckpointError(
                    f"{INDEX_FILE}: shard of tensor {tensor!r:.200} must be a file name, got {short_repr(shard)}"
                )
        for shard in set(weight_map.values()):
            try:
                check_name(shard, "shard")
            except UnsafePathError as exc:
                tensor = next(t for t, s in weight_map.items() if s == shard)
                raise CheckpointError(f"{INDEX_FILE}: tensor {tensor!r:.200}: {exc}") from None
        return weight_map

    def _check_index(self, weight_map: dict[str, str]) -> None:
        """Every tensor is where the index says, and the index lists every tensor."""
        for tensor, shard in weight_map.items():
            info = self.tensors.get(tensor)
            if info is None:
                raise CheckpointError(f"{INDEX_FILE} maps tensor {tensor!r:.200} to {shard}, which does not contain it")
            if info.file != self.directory / shard:
                raise CheckpointError(
                    f"{INDEX_FILE} maps tensor {tensor!r:.200} to {shard}, but it is in {self._name(info)}"
                )
        unlisted = [t for t in self.tensors if t not in weight_map]
        if unlisted:
            raise CheckpointError(
                f"{INDEX_FILE} does not list tensor {unlisted[0]!r:.200} of {self._name(self.tensors[unlisted[0]])}"
                + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
            )

    def _name(self, info: TensorInfo) -> str:
        """The name of a tensor's file in the checkpoint directory."""
        return info.file.relative_to(self.directory).as_posix()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def raw(self, name: str) -> np.ndarray:
        """The stored tensor as a read-only memory map in its stored dtype."""
        info = self.tensors[name]
        dtype = _DTYPES[info.dtype]
        count = (info.end - info.start) // dtype.itemsize
        if count == 0:
            empty = np.empty(info.shape, dtype)
            empty.flags.writeable = False
            return empty
        fd = self._fds.get(info.file)
        if fd is None:
            raise CheckpointError(f"{info.file.name}: checkpoint was closed")
        if os.fstat(fd).st_size < info.end:  # a page beyond the end of a mapped file is SIGBUS, not an error
            raise CheckpointError(f"{info.file.name}: file shrank after it was opened (tensor {name!r})")
        page = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, info.end - page, offset=page, access=mmap.ACCESS_READ)
        arr = np.frombuffer(mapped, dtype=dtype, count=count, offset=info.start - page)
        return arr.reshape(info.shape)

    def nbytes(self, name: str) -> int:
        """The tensor's stored bytes."""
        info = self.tensors[name]
        return info.end - info.start

    def rows(self, name: str) -> int:
        """How many rows (entries along the first axis) a tensor has; a scalar counts as one."""
        shape = self.tensors[name].shape
        return shape[0] if shape else 1

    def raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of a tensor in its stored dtype, read with ``pread`` from the descriptor
        that was opened and checked into a new array. Unlike :meth:`raw`, nothing stays mapped: the
        file's pages are the kernel's page cache, not this process's resident memory."""
        info = self.tensors[name]
        rows = self.rows(name)
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"{name}: rows [{start}, {stop}) outside [0, {rows})")
        dtype = _DTYPES[info.dtype]
        out = np.empty((stop - start, *info.shape[1:]) if info.shape else (), dtype)
        if not out.size:
            return out
        fd = self._fds.get(info.file)
        if fd is None:
            raise CheckpointError(f"{info.file.name}: checkpoint was closed")
        row_bytes = (info.end - info.start) // rows
        buf = memoryview(out.reshape(-1).view(np.uint8))
        at, done = info.start + start * row_bytes, 0
        while done < len(buf):
            got = os.preadv(fd, [buf[done:]], at + done)
            if not got:
                raise CheckpointError(f"{info.file.name}: file shrank after it was opened (tensor {name!r})")
            done += got
        return out

    def read(
        self, name: str, block_size: tuple[int, int] | None = None, start: int = 0, stop: int | None = None
    ) -> np.ndarray:
        """The tensor, or its rows ``[start, stop)``, as float32; FP8 e4m3 weights are dequantized with
        their ``*_scale_inv`` blocks. Reading a tensor slice by slice gives the same values as reading
        it whole, in memory proportional to the slice."""
        info = self.tensors[name]
        stop = self.rows(name) if stop is None else stop
        arr = self.raw_rows(name, start, stop)
        if info.dtype == "F8_E4M3":
            scale_name = name + "_scale_inv"
            if scale_name not in self.tensors:
                raise CheckpointError(f"{name}: FP8 weight without its scale tensor {scale_name!r}")
            bm, bn = block_size or (128, 128)
            scale_info = self.tensors[scale_name]
            want = (-(-info.shape[0] // bm), -(-info.shape[1] // bn)) if len(info.shape) == 2 else None
            if want is not None and scale_info.shape == want and stop > start:
                scale_rows = self.raw_rows(scale_name, start // bm, -(-stop // bm))
            else:  # dequantize_fp8 names the problem
                scale_rows = self.raw_rows(scale_name, 0, self.rows(scale_name))
            return dequantize_fp8(arr, scale_rows, (bm, bn), name, start, info.shape, scale_info.shape)
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise CheckpointError(f"{name}: contains NaN or infinite values")
        return out


def dequantize_fp8(
    weight: np.ndarray,
    scale_inv: np.ndarray,
    block: tuple[int, int],
    name: str,
    start: int = 0,
    shape: tuple[int, ...] | None = None,
    scale_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """DeepSeek block FP8: ``w[i, j] = q[i, j] * scale_inv[i // bm, j // bn]``.

    ``weight`` may be the rows ``start:`` of a tensor of ``shape``; ``scale_inv`` then holds the scale
    rows from ``start // bm`` on (``scale_shape`` is the whole scale tensor's)."""
    shape = tuple(weight.shape) if shape is None else tuple(shape)
    scale_shape = tuple(scale_inv.shape) if scale_shape is None else tuple(scale_shape)
    if len(shape) != 2:
        raise CheckpointError(f"{name}: FP8 block dequantization needs a 2-D weight, got {shape}")
    rows, cols = weight.shape
    bm, bn = block
    want = (-(-shape[0] // bm), -(-shape[1] // bn))
    if scale_shape != want:
        raise CheckpointError(f"{name}_scale_inv: shape {scale_shape}, expected {want} for {block} blocks")
    # gather by block index: memory in proportion to the weight, whatever the block size
    first = start // bm
    scale = scale_inv.astype(np.float32)[np.arange(start, start + rows) // bm - first][:, np.arange(cols) // bn]
    out = weight.astype(np.float32)
    out *= scale
    if not np.isfinite(out).all():
        raise CheckpointError(f"{name}: FP8 dequantization produced NaN or infinite values")
    return out


MTP_PATTERN = re.compile(r"^model\.layers\.(\d+)\.")
