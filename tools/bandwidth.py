"""How close decode comes to the memory-bandwidth limit: active weight bytes per token and read bandwidth."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from moeport.exporter.manifest import Artifact
from moeport.exporter.sizes import StoredTensor, stored_tensors
from moeport.models.config import DeepseekConfig


def held_bytes(t: StoredTensor, half_kernels: bool = True, quant_kernels: bool = True) -> tuple[int, bool]:
    """(bytes the cpu backend holds for ``t``, whether they are the artifact's file pages, mapped in place).

    Measured on the bench preset (anonymous vs file-backed RSS after a load): moeport's kernels read
    bf16/fp16 Linear and expert weights and int8/int4 codes in place; without them ONNX Runtime widens
    half weights to float32 (twice the bytes) and pre-packs quantized ones (a copy). The absorbed
    ``kv_b_proj`` halves (``MatMul`` of a Cast) are read as stored by ``HeadsMatMulBf16`` when bf16 and
    the kernels are on, else widened; float32 Linear weights are pre-packed
    by ONNX Runtime's Gemm (a copy); the embedding (``Gather``), float32 experts, norms and router stay
    mapped."""
    n = t.nbytes
    if t.dtype in ("bf16", "fp16"):
        if (t.use == "matmul" and not (half_kernels and t.dtype == "bf16")) or (
            t.use in ("gemm", "experts") and not half_kernels
        ):
            return 2 * n, False
        if t.use == "tied" and not half_kernels:  # read by the Gather as stored and by the head widened
            return 3 * n, False
        return n, True
    if t.use == "quant":
        return n, quant_kernels
    if t.use in ("gemm", "matmul"):
        return n, False
    return n, True


def active_bytes(
    cfg: DeepseekConfig,
    weights: str,
    block_size: int | None = None,
    as_run_on_cpu: bool = True,
    half_kernels: bool = False,
    quant_kernels: bool = True,
) -> float:
    """Weight bytes one decode step must read for ``cfg`` exported with ``weights``: attention, dense MLPs,
    shared + routed top-k experts, router, norms, the output head and one embedding row. ``as_run_on_cpu``
    counts them as the cpu backend holds them (:func:`held_bytes`), else as stored."""
    total = 0.0
    for t in stored_tensors(cfg, weights, block_size):
        total += (read_bytes(t, half_kernels, quant_kernels) if as_run_on_cpu else t.nbytes) * t.active
    return total


def read_bytes(t: StoredTensor, half_kernels: bool = True, quant_kernels: bool = True) -> int:
    """Bytes of ``t`` one token reads (if it reads it whole) as the cpu backend holds it: :func:`held_bytes`,
    except that a tied half embedding without the kernels is read through its float32 copy only."""
    n = held_bytes(t, half_kernels, quant_kernels)[0]
    return 2 * t.nbytes if t.use == "tied" and n == 3 * t.nbytes else n


def active_bytes_per_token(artifact: Artifact, as_run_on_cpu: bool = True, half_kernels: bool = False) -> float:
    """:func:`active_bytes` of an exported artifact (its weights dtype and block size from the manifest)."""
    w = artifact.manifest["weights"]
    return active_bytes(artifact.config, w["dtype"], w.get("block_size"), as_run_on_cpu, half_kernels)


def read_bandwidth(threads: int = 1, megabytes: int = 1024, repeats: int = 3) -> float:
    """Bytes per second that ``threads`` threads read from memory (numpy sums release the GIL)."""
    chunk = np.ones(megabytes * (1 << 20) // 4 // threads, np.float32)
    chunks = [chunk] + [chunk.copy() for _ in range(threads - 1)]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = max(best, sum(c.nbytes for c in chunks) / (time.perf_counter() - t))
    return best
