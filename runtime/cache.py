"""The latent KV cache of one sequence: per-layer buffers that grow geometrically, written in place."""

from __future__ import annotations

import mmap

import numpy as np

_MAPPED_BYTES = 256 << 10  # blocks this large get pages of their own


def _zeros_block(layers: int, capacity: int, dim: int, dtype: np.dtype) -> list[np.ndarray]:
    """``layers`` zeroed ``[1, capacity, dim]`` buffers, views of one block. A large block is an anonymous
    memory map, unmapped when its last view goes: an outgrown cache hands its pages back to the OS
    (freed to malloc's heap they would stay with the process, as much again as the cache itself)."""
    shape = (layers, 1, capacity, dim)
    nbytes = layers * capacity * dim * dtype.itemsize
    if nbytes < _MAPPED_BYTES:
        return list(np.zeros(shape, dtype))
    return list(np.frombuffer(mmap.mmap(-1, nbytes), dtype).reshape(shape))


class LatentCache:
    """``layers`` buffers of shape ``[1, capacity, dim]``; the first ``length`` rows are the sequence.

    The graph returns only the new rows of each step; they are written into spare capacity, so a
    decode step costs O(new rows), not O(context). Buffers double when full (amortized O(1)).
    """

    def __init__(self, layers: int, dim: int, dtype: np.dtype = np.float32, capacity: int = 16, fixed: bool = False):
        """``fixed``: the capacity never grows (static-shape backends get the whole buffers every step)."""
        self.layers, self.dim, self.dtype, self.fixed = layers, dim, np.dtype(dtype), fixed
        self.buffers = _zeros_block(layers, capacity, dim, self.dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the sequence's rows (not counting spare capacity)."""
        return self.layers * self.length * self.dim * self.dtype.itemsize

    def views(self) -> list[np.ndarray]:
        """The valid rows of each layer, ``[1, length, dim]``, as contiguous views (no copy)."""
        return [buf[:, : self.length] for buf in self.buffers]

    def append(self, rows: list[np.ndarray]) -> None:
        """Write ``[1, n, dim]`` new rows per layer after the current ones."""
        n = rows[0].shape[1]
        need = self.length + n
        if need > self.capacity:
            if self.fixed:
                raise ValueError(f"the cache holds {self.capacity} rows; {self.length} + {n} do not fit")
            capacity = max(need, 2 * self.capacity)
            grown = _zeros_block(self.layers, capacity, self.dim, self.dtype)
            for new, buf in zip(grown, self.buffers, strict=True):
                new[:, : self.length] = buf[:, : self.length]
            self.buffers = grown
        for buf, r in zip(self.buffers, rows, strict=True):
            buf[:, self.length : need] = r
        self.length = need

    def truncate(self, length: int) -> None:
        self.length = length

    def copy(self) -> LatentCache:
        capacity = self.capacity if self.fixed else max(self.length, 16)
        other = LatentCache(self.layers, self.dim, self.dtype, capacity=capacity, fixed=self.fixed)
        if self.length:
            other.append(self.views())
        return other
