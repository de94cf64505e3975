"""Memory-mapped reading of Hugging Face safetensors checkpoints (one file or shards).

The safetensors header is parsed here and tensor data is exposed as ``numpy.memmap`` views, so a
tensor is read from disk only when it is used. (The ``safetensors`` package's numpy interface has no
bfloat16 or float8 dtypes, which DeepSeek releases use.) Every header is validated against the file
size, so truncated or corrupt files fail with the file's name before anything is exported.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

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
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """The checkpoint's weight files are missing, corrupt, or do not match the config."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int


class Checkpoint:
    """Index of every tensor in a checkpoint directory; tensors are read lazily via mmap."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        files = self._weight_files()
        for file in files:
            for info in _read_header(file):
                if info.name in self.tensors:
                    raise CheckpointError(
                        f"{file.name}: tensor {info.name!r} also in {self.tensors[info.name].file.name}"
                    )
                self.tensors[info.name] = info
        self.files = files

    def _weight_files(self) -> list[Path]:
        d = self.directory
        index = d / "model.safetensors.index.json"
        single = d / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: unreadable shard index ({exc})") from exc
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (d / n).is_file()]
            if missing:
                raise CheckpointError(f"{index.name} names shard(s) that are missing: {', '.join(missing)}")
            return [d / n for n in names]
        if single.is_file():
            return [single]
        shards = sorted(d.glob("*.safetensors"))
        if shards:
            return shards
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise CheckpointError(
                f"{d}: only pickle weights found ({', '.join(pickles)}); moeport never loads pickle files "
                "(they can run arbitrary code). Convert them to safetensors first."
            )
        raise CheckpointError(f"{d}: no model.safetensors, shards or model.safetensors.index.json found")

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
        count = int(np.prod(info.shape, dtype=np.int64)) if info.shape else 1
        arr = np.memmap(info.file, dtype=dtype, mode="r", offset=info.start, shape=(count,))
        return arr.reshape(info.shape)

    def read(self, name: str, block_size: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor as float32; FP8 e4m3 weights are dequantized with their ``*_scale_inv`` blocks."""
        info = self.tensors[name]
        arr = self.raw(name)
        if info.dtype == "F8_E4M3":
            scale_name = name + "_scale_inv"
            if scale_name not in self.tensors:
                raise CheckpointError(f"{name}: FP8 weight without its scale tensor {scale_name!r}")
            return dequantize_fp8(arr, self.raw(scale_name), block_size or (128, 128), name)
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise CheckpointError(f"{name}: contains NaN or infinite values")
        return out


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str) -> np.ndarray:
    """DeepSeek block FP8: ``w[i, j] = q[i, j] * scale_inv[i // bm, j // bn]``."""
    if weight.ndim != 2:
        raise CheckpointError(f"{name}: FP8 block dequantization needs a 2-D weight, got {weight.shape}")
    rows, cols = weight.shape
    bm, bn = block
    want = (-(-rows // bm), -(-cols // bn))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"{name}_scale_inv: shape {tuple(scale_inv.shape)}, expected {want} for {block} blocks")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), bm, axis=0), bn, axis=1)[:rows, :cols]
    out = weight.astype(np.float32) * scale
    if not np.isfinite(out).all():
        raise CheckpointError(f"{name}: FP8 dequantization produced NaN or infinite values")
    return out


def _read_header(file: Path) -> list[TensorInfo]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file.name}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{file.name}: corrupt or truncated safetensors header (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{file.name}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file.name}: corrupt safetensors header")
    base = 8 + n
    infos = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file.name}: corrupt header entry for {name!r}") from exc
        if dtype not in _DTYPES:
            raise CheckpointError(f"{file.name}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if end - start != nbytes or start < 0:
            raise CheckpointError(f"{file.name}: tensor {name!r} byte range does not match its shape {shape}")
        if base + end > size:
            raise CheckpointError(
                f"{file.name}: truncated (tensor {name!r} ends at byte {base + end}, file has {size})"
            )
        infos.append(TensorInfo(name, dtype, shape, file, base + start, base + end))
    return infos


MTP_PATTERN = re.compile(r"^model\.layers\.(\d+)\.")
