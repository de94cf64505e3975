"""How close decode comes to the memory-bandwidth limit: active weight bytes per token and read bandwidth."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from moeport.exporter.manifest import Artifact

_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}


def active_bytes_per_token(artifact: Artifact, as_run_on_cpu: bool = True, half_kernels: bool = False) -> float:
    """Weight bytes one decode step must read: attention, dense MLPs, shared + routed top-k experts,
    the output head and one embedding row. ``as_run_on_cpu`` counts bf16/fp16 weights as the float32
    the cpu backend holds them in, except, with its ``half_kernels``, the Linear and expert weights its
    kernels read as stored; quantized weights count their codes plus float32 block scales."""
    cfg = artifact.config
    w = artifact.manifest["weights"]
    dtype = w["dtype"]
    if dtype in ("int8", "int4"):
        bits, block = (8 if dtype == "int8" else 4), w["block_size"]
        linear = bits / 8 + 4 / block
        head = max(bits, 8) / 8 + 4 / block
        other = 4.0 if as_run_on_cpu else 2.0  # bf16 storage of the non-Linear tensors
    else:
        linear = head = other = 4.0 if as_run_on_cpu else _BYTES[dtype]
        if as_run_on_cpu and half_kernels:
            linear = head = _BYTES[dtype]
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    attn = cfg.q_lora_rank * h + cfg.q_lora_rank * nh * cfg.qk_head_dim if cfg.q_lora_rank else h * nh * cfg.qk_head_dim
    attn += h * cfg.latent_dim + h * nh * cfg.v_head_dim
    absorbed = nh * cfg.qk_nope_head_dim * cfg.kv_lora_rank + nh * cfg.latent_dim * cfg.v_head_dim
    per_expert = 3 * h * cfg.moe_intermediate_size
    total = 0.0
    for layer in range(cfg.num_hidden_layers):
        total += attn * linear + absorbed * other
        if cfg.is_moe_layer(layer):
            total += (cfg.n_shared_experts + cfg.num_experts_per_tok) * per_expert * linear
            total += cfg.n_routed_experts * h * 4  # router (float32)
        else:
            total += 3 * h * cfg.intermediate_size * linear
    total += cfg.vocab_size * h * head + h * other
    return total


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
