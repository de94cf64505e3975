"""Checks moeport's kernel library against float64 numpy on the code path this process gets: bf16/fp16
weights, and int8/int4 block-quantized ones against their dequantized values.

Run by tests/test_cpu_kernels.py as ``python kernel_check.py LIB`` with ``MOEPORT_KERNELS_ISA`` set
(the library picks its path once per process); prints one JSON line. ``python kernel_check.py LIB
--memory`` instead reports, from a fresh process, what the library holds: per-thread scratch after
threads exit, and the workspace pool after a large call then decode-sized ones.
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
import time

import ml_dtypes
import numpy as np

from moeport.exporter.ops import dequantize_blocks, quantize_blocks

HALF = {16: ml_dtypes.bfloat16, 10: np.float16}


ACT8 = 0x100  # MOEPORT_ACT8: 4-bit products that may round x to int8 per block (the *A8 ops)


def _ptr(a):
    return a.ctypes.data if isinstance(a, np.ndarray) else a


def _moe(lib, x, idx, weights, gate_up, down, inter, dtype, err, gs=None, ds=None, block=0) -> tuple[int, np.ndarray]:
    (tokens, hidden), k, experts = x.shape, idx.shape[1], gate_up.shape[0]
    y = np.full((tokens, hidden), np.nan, np.float32)
    args = (x, tokens, hidden, idx, weights, k, gate_up, gs, down, ds, block, experts, inter, y, dtype, err, 256)
    return lib.moeport_moe_serial(*[_ptr(a) for a in args]), y


def _moe_reference(x, idx, weights, g, d) -> np.ndarray:
    ref = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            h = g[idx[t, j]] @ x[t]
            act = h[0::2] / (1 + np.exp(-h[0::2])) * h[1::2]
            ref[t] += weights[t, j] * (d[idx[t, j]] @ act)
    return ref


def _attention_reference(q, past, new, allowed, scale) -> np.ndarray:
    """LatentAttention's definition (exporter/ops.py) in float64, masked scores at float32's lowest value."""
    kv = np.concatenate([past, new], 1).astype(np.float64)  # [B, T, D]
    scores = np.einsum("bhsd,btd->bhst", q.astype(np.float64), kv) * scale
    scores = np.where(allowed, scores, np.finfo(np.float32).min)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhst,btd->bhsd", e / e.sum(-1, keepdims=True), kv)


def _rel(y, ref) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def main(path: str) -> None:
    lib = ctypes.CDLL(path)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moeport_linear_serial.argtypes = [p, i64, i64, p, p, i64, i64, p, ctypes.c_int]
    lib.moeport_moe_serial.argtypes = [p, i64, i64, p, p, i64, p, p, p, p, i64, i64, i64, p, ctypes.c_int]
    lib.moeport_moe_serial.argtypes += [ctypes.c_char_p, ctypes.c_size_t]
    lib.moeport_kernels_isa.restype = ctypes.c_char_p
    lib.moeport_heads_matmul_serial.argtypes = [p, i64, i64, i64, i64, p, i64, p]
    rng = np.random.default_rng(0)
    worst_linear = worst_moe = 0.0
    # (m, k, n): decode rows (m <= 4), wider products, K not a multiple of 16/32, N not of 4/32
    shapes = [
        (1, 1024, 96),
        (3, 37, 13),
        (4, 64, 64),
        (5, 100, 6),
        (17, 64, 96),
        (33, 64, 100),
        (40, 96, 33),
        (7, 1, 5),
    ]
    for dtype, np_half in HALF.items():
        for m, k, n in shapes:
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = rng.standard_normal((n, k)).astype(np_half)
            y = np.full((m, n), np.nan, np.float32)
            assert lib.moeport_linear_serial(x.ctypes.data, m, k, w.ctypes.data, None, 0, n, y.ctypes.data, dtype) == 0
            ref = x.astype(np.float64) @ w.astype(np.float64).T
            worst_linear = max(worst_linear, _rel(y, ref))

        tokens, hidden, experts, inter, k = 21, 64, 8, 48, 3
        x = rng.standard_normal((tokens, hidden)).astype(np.float32)
        idx = np.stack([rng.choice(experts - 1, k, replace=False) for _ in range(tokens)]).astype(np.int64)  # 7 unused
        weights = rng.random((tokens, k)).astype(np.float32)
        gate_up = rng.standard_normal((experts, 2 * inter, hidden)).astype(np_half)
        down = rng.standard_normal((experts, hidden, inter)).astype(np_half)
        err = ctypes.create_string_buffer(256)

        rc, y = _moe(lib, x, idx, weights, gate_up, down, inter, dtype, err)
        assert rc == 0, err.value
        ref = _moe_reference(x, idx, weights, gate_up.astype(np.float64), down.astype(np.float64))
        worst_moe = max(worst_moe, _rel(y, ref))
        bad = idx.copy()
        bad[2, 1] = 9
        rc, _ = _moe(lib, x, bad, weights, gate_up, down, inter, dtype, err)
        assert rc == -1
    # block-quantized weights (moeport's QLinear/QMoE format), against float64 on the dequantized weights;
    # (m, k, n, block) with decode and prefill row counts, every block size from 16 up
    q_linear = q_moe = q_a8 = 0.0
    for bits in (8, 4):
        for m, k, n, block in [
            (1, 1024, 96, 32),
            (3, 64, 13, 16),
            (4, 128, 64, 64),
            (2, 96, 33, 32),  # k not a multiple of 64: the last VNNI chunk is partial
            (1, 48, 7, 16),
            (17, 64, 96, 32),
            (33, 256, 100, 128),
            (40, 96, 33, 32),
            (2, 4096, 6, 4096),  # one block longer than the avx2 path's int32 sums may run: flushed in parts
        ]:
            x = rng.standard_normal((m, k)).astype(np.float32)
            codes, scales = quantize_blocks(rng.standard_normal((n, k)).astype(np.float32), bits, block)
            ref = x.astype(np.float64) @ dequantize_blocks(codes, scales, bits, block).astype(np.float64).T
            for act8 in (0, ACT8) if bits == 4 else (0,):  # 4-bit codes: also with x rounded to int8 (A8 ops)
                y = np.full((m, n), np.nan, np.float32)
                args = (x, m, k, codes, scales, block, n, y, bits | act8)
                assert lib.moeport_linear_serial(*[_ptr(a) for a in args]) == 0
                if act8:
                    q_a8 = max(q_a8, _rel(y, ref))
                else:
                    q_linear = max(q_linear, _rel(y, ref))
        tokens, hidden, experts, inter, k, block = 21, 64, 8, 64, 3, 32
        x = rng.standard_normal((tokens, hidden)).astype(np.float32)
        idx = np.stack([rng.choice(experts - 1, k, replace=False) for _ in range(tokens)]).astype(np.int64)
        weights = rng.random((tokens, k)).astype(np.float32)
        gc, gs = quantize_blocks(rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32), bits, block)
        dc, ds = quantize_blocks(rng.standard_normal((experts, hidden, inter)).astype(np.float32), bits, block)
        g, d = (dequantize_blocks(c, s, bits, block).astype(np.float64) for c, s in ((gc, gs), (dc, ds)))
        for rows in (tokens, 1, 2):  # prefill-sized experts, then decode-sized (one or two tokens)
            want = _moe_reference(x[:rows], idx[:rows], weights[:rows], g, d)
            for act8 in (0, ACT8) if bits == 4 else (0,):
                rc, y = _moe(lib, x[:rows], idx[:rows], weights[:rows], gc, dc, inter, bits | act8, err, gs, ds, block)
                assert rc == 0, err.value
                if act8:
                    q_a8 = max(q_a8, _rel(y, want))
                else:
                    q_moe = max(q_moe, _rel(y, want))
    # LatentAttention: (batch, heads, new rows, row length, cached rows, left padding of rows 1..);
    # decode with keys split in ranges (T >= 256), prefill blocks, D not a multiple of 16, padded queries
    # that may see no key at all (the reference's mean of all rows)
    lib.moeport_latent_attention_serial.argtypes = [p, i64, i64, i64, i64, p, i64, p, p, ctypes.c_int]
    lib.moeport_latent_attention_serial.argtypes += [ctypes.c_float, p]
    # HeadsMatMulBf16: x [outer, H, S, K] . W[h] [K, N] bf16, N with and without a partial 64-column chunk
    heads_err = 0.0
    for outer, heads, seq, k, n in [(1, 3, 1, 16, 64), (2, 3, 5, 24, 70), (1, 16, 1, 128, 512), (1, 2, 7, 9, 130)]:
        x = rng.standard_normal((outer, heads, seq, k)).astype(np.float32)
        w = rng.standard_normal((heads, k, n)).astype(ml_dtypes.bfloat16)
        y = np.full((outer, heads, seq, n), np.nan, np.float32)
        assert lib.moeport_heads_matmul_serial(*[_ptr(a) for a in (x, outer, heads, seq, k, w, n, y)]) == 0
        heads_err = max(heads_err, _rel(y, x.astype(np.float64) @ w.astype(np.float64)))
    attention = 0.0
    for batch, heads, seq, dim, cached, pad in [
        (1, 8, 1, 288, 2048, 0),
        (3, 4, 1, 17, 300, 40),
        (1, 8, 1, 40, 5, 0),
        (2, 3, 7, 40, 9, 2),
        (1, 8, 70, 48, 0, 0),
        (2, 5, 9, 33, 0, 4),
        (2, 8, 33, 64, 70, 75),
        (1, 128, 2, 576, 300, 0),
    ]:
        total = cached + seq
        q = rng.standard_normal((batch, heads, seq, dim)).astype(np.float32)
        past = rng.standard_normal((batch, cached, dim)).astype(np.float32)
        new = rng.standard_normal((batch, seq, dim)).astype(np.float32)
        mask = np.ones((batch, total), bool)
        mask[1:, :pad] = False
        causal = np.arange(total)[None, :] <= np.arange(cached, total)[:, None]
        allowed = (causal[None] & mask[:, None, :])[:, None].copy()  # [B, 1, S, T]
        out = np.full(q.shape, np.nan, np.float32)
        args = (q, batch, heads, seq, dim, past if cached else None, cached, new, allowed, int(batch > 1), 0.125, out)
        assert lib.moeport_latent_attention_serial(*[_ptr(a) for a in args]) == 0
        attention = max(attention, _rel(out, _attention_reference(q, past, new, allowed, 0.125)))
    print(
        json.dumps(
            {
                "isa": lib.moeport_kernels_isa().decode(),
                "attention_max_rel_err": attention,
                "heads_matmul_max_rel_err": heads_err,
                "linear_max_rel_err": worst_linear,
                "moe_max_rel_err": worst_moe,
                "quantized_linear_max_rel_err": q_linear,
                "quantized_moe_max_rel_err": q_moe,
                "quantized_int8_activations_max_rel_err": q_a8,
                "bad_index_error": err.value.decode(),
            }
        )
    )


def _stats(lib, fn: str, n: int) -> list[int]:
    out = [ctypes.c_int64() for _ in range(n)]
    getattr(lib, fn)(*[ctypes.byref(x) for x in out])
    return [x.value for x in out]


def memory(path: str) -> None:
    """Scratch of exited threads is freed; the pool gives back a large call's workspace once calls are small."""
    lib = ctypes.CDLL(path)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moeport_latent_attention_serial.argtypes = [p, i64, i64, i64, i64, p, i64, p, p, ctypes.c_int]
    lib.moeport_latent_attention_serial.argtypes += [ctypes.c_float, p]
    lib.moeport_moe_serial.argtypes = [p, i64, i64, p, p, i64, p, p, p, p, i64, i64, i64, p, ctypes.c_int]
    lib.moeport_moe_serial.argtypes += [ctypes.c_char_p, ctypes.c_size_t]
    lib.moeport_buffer_cycle.argtypes = [ctypes.c_size_t]
    rng = np.random.default_rng(0)
    report: dict = {"scratch_before": _stats(lib, "moeport_scratch_stats", 2)}

    def attention() -> None:  # uses the calling thread's scratch
        q = rng.standard_normal((1, 16, 4, 64)).astype(np.float32)
        new = rng.standard_normal((1, 4, 64)).astype(np.float32)
        allowed = np.ones((1, 1, 4, 4), bool)
        out = np.empty_like(q)
        args = (q, 1, 16, 4, 64, None, 0, new, allowed, 0, 0.125, out)
        assert lib.moeport_latent_attention_serial(*[_ptr(a) for a in args]) == 0

    threads = 6
    ran, leave = threading.Barrier(threads + 1), threading.Event()

    def work() -> None:
        attention()
        ran.wait()
        leave.wait()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    ran.wait()
    report["scratch_while_running"] = _stats(lib, "moeport_scratch_stats", 2)
    leave.set()
    for t in workers:
        t.join()
    # join() returns when the Python thread is done; the OS thread runs its key destructors just after
    deadline = time.monotonic() + 5
    while _stats(lib, "moeport_scratch_stats", 2)[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    report["scratch_after_exit"] = _stats(lib, "moeport_scratch_stats", 2)

    # a prefill-sized MoE call (34 MB of workspace), then decode-sized ones
    tokens, hidden, experts, inter, k = 2048, 512, 8, 16, 4
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    idx = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int64)
    weights = rng.random((tokens, k)).astype(np.float32)
    gate_up = rng.standard_normal((experts, 2 * inter, hidden)).astype(ml_dtypes.bfloat16)
    down = rng.standard_normal((experts, hidden, inter)).astype(ml_dtypes.bfloat16)
    err = ctypes.create_string_buffer(256)
    rc, _ = _moe(lib, x, idx, weights, gate_up, down, inter, 16, err)
    assert rc == 0, err.value
    report["pool_after_prefill"] = _stats(lib, "moeport_pool_stats", 3)
    for _ in range(100):
        rc, _ = _moe(lib, x[:1], idx[:1], weights[:1], gate_up, down, inter, 16, err)
        assert rc == 0, err.value
    report["pool_after_decode"] = _stats(lib, "moeport_pool_stats", 3)
    # a run of large requests reuses one buffer; small ones after it let it go
    lib.moeport_buffer_cycle(512 << 20)
    first = _stats(lib, "moeport_pool_stats", 3)
    for _ in range(5):
        lib.moeport_buffer_cycle(512 << 20)
    report["pool_large_run"] = [first, _stats(lib, "moeport_pool_stats", 3)]
    for _ in range(100):
        lib.moeport_buffer_cycle(64 << 10)
    report["pool_after_small"] = _stats(lib, "moeport_pool_stats", 3)
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[2:] == ["--memory"]:
        memory(sys.argv[1])
    else:
        main(sys.argv[1])
