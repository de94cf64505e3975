"""`moeport bench`: prefill and decode speed, load time and peak memory of one artifact on one backend."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from moeport.runtime.model import load

from .bandwidth import active_bytes_per_token


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


def page_faults() -> tuple[int, int]:
    """(major, minor) page faults of this process so far, all threads (ONNX Runtime's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_majflt, r.ru_minflt


def run_bench(
    artifact: str | Path,
    backend: str = "cpu",
    prompt_len: int = 128,
    new_tokens: int = 64,
    threads: int | None = None,
    seed: int = 0,
    repeats: int = 3,
    **options: Any,
) -> dict[str, Any]:
    """Load, prefill ``prompt_len`` random tokens, then greedily decode ``new_tokens``, after a full-size
    warm-up; the best of ``repeats`` runs is reported.

    ``options`` go to :func:`moeport.load` (``verify``, backend compile options)."""
    t0 = time.perf_counter()
    model = load(artifact, backend=backend, threads=threads, **options)
    load_s = time.perf_counter() - t0
    if prompt_len + new_tokens > model.max_seq_len:
        raise ValueError(
            f"prompt-len + new-tokens ({prompt_len + new_tokens}) exceeds the artifact's max sequence "
            f"length {model.max_seq_len}"
        )
    rng = np.random.default_rng(seed)
    prompt = rng.integers(2, model.vocab_size, size=prompt_len).tolist()

    # warm-up at full size: first calls allocate buffers, pick kernels and fault in the mapped weights
    warm = model.session()
    warm.prefill(rng.integers(2, model.vocab_size, size=prompt_len).tolist())
    for _ in range(4):
        warm.step(1)

    prefill_s = decode_s = float("inf")
    faults = (0, 0)
    for _ in range(repeats):  # best of `repeats`: the machine's noise only ever slows a run down
        s = model.session()
        t1 = time.perf_counter()
        logits = s.prefill(prompt)
        prefill_s = min(prefill_s, time.perf_counter() - t1)
        token = int(np.argmax(logits))
        before = page_faults()
        t2 = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(s.step(token)))
        elapsed = time.perf_counter() - t2
        after = page_faults()
        if elapsed < decode_s:  # the faults of the run reported
            decode_s, faults = elapsed, (after[0] - before[0], after[1] - before[1])
    manifest = model.artifact.manifest
    active = active_bytes_per_token(model.artifact, half_kernels=getattr(model.program, "half_kernels", False))
    return {
        "artifact": str(artifact),
        "backend": model.backend_name,
        "weights": manifest["weights"]["dtype"],
        "weight_bytes": manifest["weights"]["bytes"],
        "threads": threads,
        "options": options,
        "prompt_len": prompt_len,
        "repeats": repeats,
        "new_tokens": new_tokens,
        "load_seconds": round(load_s, 3),
        "prefill_tokens_per_second": round(prompt_len / prefill_s, 2),
        "decode_tokens_per_second": round(new_tokens / decode_s, 2) if new_tokens else 0.0,
        "decode_ms_per_token": round(1000 * decode_s / new_tokens, 3) if new_tokens else 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "active_weight_mb_per_token": round(active / 1e6, 1),
        "decode_weight_gb_per_second": round(active * new_tokens / decode_s / 1e9, 2) if new_tokens else 0.0,
        # page faults during the reported decode: major ones read from disk (a larger-than-RAM artifact's
        # experts paged in), minor ones map a page already in memory
        "decode_major_faults": faults[0],
        "decode_minor_faults": faults[1],
        "decode_major_faults_per_token": round(faults[0] / new_tokens, 2) if new_tokens else 0.0,
        "decode_minor_faults_per_token": round(faults[1] / new_tokens, 2) if new_tokens else 0.0,
        "decode_major_faults_per_second": round(faults[0] / decode_s, 1) if new_tokens else 0.0,
        "decode_minor_faults_per_second": round(faults[1] / decode_s, 1) if new_tokens else 0.0,
    }
