"""The latent KV cache of one sequence: per-layer buffers that grow geometrically, written in place; and
the shared buffers that sessions decoded together in one batch live in while they are batched."""

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


def _zeros_batch(layers: int, batch: int, capacity: int, dim: int, dtype: np.dtype) -> list[np.ndarray]:
    """``layers`` zeroed ``[batch, capacity, dim]`` buffers, views of one block (mapped when large)."""
    shape = (layers, batch, capacity, dim)
    nbytes = layers * batch * capacity * dim * dtype.itemsize
    if nbytes < _MAPPED_BYTES:
        return list(np.zeros(shape, dtype))
    return list(np.frombuffer(mmap.mmap(-1, nbytes), dtype).reshape(shape))


class BatchBuffers:
    """One ``[batch, capacity, dim]`` buffer per layer in which the caches of ``batch`` sessions decoded
    together live, row ``r`` for one session: a batched step passes these buffers as they are (each
    session's rows from position 0, the rest masked out) instead of copying every session's cache into
    a padded array at every step. Sessions attach when a batch forms and keep writing their new rows in
    place; a session whose cache outgrows ``capacity`` moves back to buffers of its own."""

    def __init__(self, layers: int, batch: int, capacity: int, dim: int, dtype: np.dtype):
        self.batch, self.capacity = batch, capacity
        self.arrays = _zeros_batch(layers, batch, capacity, dim, np.dtype(dtype))
        self.members: list = []  # weak references to the caches living here (set by whoever attaches them)


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
        self.slot: tuple[BatchBuffers, int] | None = None  # (shared buffers, row) while batched

    def attach(self, shared: BatchBuffers, row: int) -> None:
        """Move this cache's rows into row ``row`` of ``shared`` and keep writing there."""
        views = [a[row : row + 1] for a in shared.arrays]  # [1, capacity, dim]: contiguous
        for new, buf in zip(views, self.buffers, strict=True):
            new[:, : self.length] = buf[:, : self.length]
        self.buffers, self.slot = views, (shared, row)

    def detach(self) -> None:
        """Move the rows back into buffers of this cache's own (the shared ones may then be freed)."""
        if self.slot is None:
            return
        own = _zeros_block(self.layers, max(self.length, 16), self.dim, self.dtype)
        for new, buf in zip(own, self.buffers, strict=True):
            new[:, : self.length] = buf[:, : self.length]
        self.buffers, self.slot = own, None

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
            self.buffers, self.slot = grown, None
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
