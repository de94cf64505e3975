"""An automatic prefix cache: latent-cache rows of token prefixes shared across requests.

Rows are kept in blocks of ``block_tokens`` tokens. A block is keyed by a cryptographic hash chain over
the tokens of the whole prefix up to its end (the key of block *i* hashes the key of block *i-1* and block
*i*'s tokens), so two requests share a block exactly when they share every token before it: a system
prompt, the earlier turns of a chat, an agent's tool descriptions. A 128-bit BLAKE2 key makes a
collision (and so one request reading another's rows) practically impossible even for a client that
chooses its tokens adversarially.

Blocks are evicted least-recently-used under a byte budget; a lookup refreshes its blocks leaf first,
so a prefix's later blocks go before its earlier ones and a surviving block is always reachable.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_ROOT = b"moeport-prefix-v1"


def _key(parent: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


@dataclass
class _Block:
    rows: np.ndarray  # [layers, block_tokens, dim]


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a prompt: ``tokens`` rows, per layer ``[1, tokens, dim]``."""

    tokens: int
    rows: list[np.ndarray]


class PrefixCache:
    """Latent rows of token prefixes in ``block_tokens``-token blocks, LRU under ``budget_bytes``.

    Thread-safe. ``hits``/``lookups`` count prompt tokens served from the cache / looked up.
    """

    def __init__(self, layers: int, dim: int, dtype=np.float32, budget_bytes: int = 512 << 20, block_tokens: int = 32):
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.layers, self.dim, self.dtype = layers, dim, np.dtype(dtype)
        self.block_tokens = block_tokens
        self.budget_bytes = max(0, int(budget_bytes))
        self.block_bytes = layers * block_tokens * dim * self.dtype.itemsize
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self._lock = threading.Lock()
        self.hit_tokens = 0
        self.lookup_tokens = 0

    @property
    def nbytes(self) -> int:
        return len(self._blocks) * self.block_bytes

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def _keys(self, tokens: Sequence[int], blocks: int) -> list[bytes]:
        keys, parent, b = [], _ROOT, self.block_tokens
        for i in range(blocks):
            parent = _key(parent, tokens[i * b : (i + 1) * b])
            keys.append(parent)
        return keys

    def lookup(self, tokens: Sequence[int], keep_last: int = 1) -> PrefixMatch:
        """The longest cached prefix of ``tokens`` that leaves at least ``keep_last`` tokens to compute (the
        last prompt token must run through the model to give the next token's logits)."""
        usable = max(0, len(tokens) - keep_last) // self.block_tokens
        keys = self._keys(tokens, usable)
        with self._lock:
            found: list[_Block] = []
            for k in keys:
                block = self._blocks.get(k)
                if block is None:
                    break
                found.append(block)
            for k in reversed(keys[: len(found)]):  # leaf first: parents stay the most recent
                self._blocks.move_to_end(k)
            self.lookup_tokens += len(tokens)
            self.hit_tokens += len(found) * self.block_tokens
        if not found:
            return PrefixMatch(0, [])
        stacked = np.concatenate([b.rows for b in found], axis=1)  # [layers, n, dim]
        return PrefixMatch(stacked.shape[1], [stacked[layer][None] for layer in range(self.layers)])

    def insert(self, tokens: Sequence[int], rows: Sequence[np.ndarray]) -> int:
        """Store the full blocks of ``tokens`` whose latent ``rows`` (per layer ``[1, >= len, dim]``) are given;
        returns how many blocks were new."""
        if self.budget_bytes < self.block_bytes:
            return 0
        n = min(len(tokens), rows[0].shape[1]) // self.block_tokens
        keys = self._keys(tokens, n)
        b, added = self.block_tokens, 0
        with self._lock:
            for i, k in enumerate(keys):
                if k not in self._blocks:
                    data = np.stack([r[0, i * b : (i + 1) * b] for r in rows]).astype(self.dtype, copy=True)
                    self._blocks[k] = _Block(data)
                    added += 1
            for k in reversed(keys):  # leaf first: parents stay the most recent, evicted last
                self._blocks.move_to_end(k)
            while self.nbytes > self.budget_bytes:
                self._blocks.popitem(last=False)
        return added

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
