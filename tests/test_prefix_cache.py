"""The prefix cache: rows of shared token prefixes, found by a hash chain, evicted LRU leaf first."""

from __future__ import annotations

import numpy as np

from moeport.runtime.prefix_cache import PrefixCache

LAYERS, DIM, BLOCK = 2, 3, 4


def rows_for(tokens: list[int]) -> list[np.ndarray]:
    """Fake latent rows that encode (layer, position, token): a reused row is recognisable."""
    n = len(tokens)
    return [
        np.stack([np.array([layer, i, t], np.float32) for i, t in enumerate(tokens)]).reshape(1, n, DIM)
        for layer in range(LAYERS)
    ]


def cache(budget_blocks: int = 100) -> PrefixCache:
    block_bytes = LAYERS * BLOCK * DIM * 4
    return PrefixCache(LAYERS, DIM, budget_bytes=budget_blocks * block_bytes, block_tokens=BLOCK)


def test_a_shared_prefix_is_found_in_whole_blocks_and_its_rows_are_the_stored_ones():
    c = cache()
    first = list(range(10, 30))  # 20 tokens: 5 blocks
    assert c.insert(first, rows_for(first)) == 5
    second = first[:13] + [99, 98, 97]  # shares 13 tokens: 3 whole blocks
    m = c.lookup(second)
    assert m.tokens == 12
    for layer in range(LAYERS):
        np.testing.assert_array_equal(m.rows[layer], rows_for(first)[layer][:, :12])
    assert c.hit_tokens == 12 and c.lookup_tokens == len(second)


def test_the_last_token_is_always_left_to_compute():
    c = cache()
    t = list(range(8))
    c.insert(t, rows_for(t))
    assert c.lookup(t).tokens == 4  # 8 cached, but the last token must run through the model
    assert c.lookup(t + [50]).tokens == 8


def test_a_different_earlier_token_means_no_reuse_of_later_blocks():
    c = cache()
    t = list(range(12))
    c.insert(t, rows_for(t))
    other = [0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11, 12]  # block 2 differs, block 3 is the same tokens
    assert c.lookup(other).tokens == 4


def test_eviction_is_lru_and_takes_a_prefix_s_leaves_before_its_root():
    c = cache(budget_blocks=3)
    a = list(range(12))  # 3 blocks: fills the budget
    c.insert(a, rows_for(a))
    b = [7] * 8  # 2 new blocks: evicts a's last two blocks, never a's first
    c.insert(b, rows_for(b))
    assert c.nbytes <= c.budget_bytes
    assert c.lookup(a + [1]).tokens == 4
    assert c.lookup(b + [1]).tokens == 8


def test_a_zero_budget_disables_the_cache():
    c = PrefixCache(LAYERS, DIM, budget_bytes=0, block_tokens=BLOCK)
    t = list(range(12))
    assert c.insert(t, rows_for(t)) == 0 and c.lookup(t + [1]).tokens == 0
