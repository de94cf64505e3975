"""What the exporter will write, computed from a config alone: every stored tensor, its bytes and how it is used.

This mirrors :class:`moeport.models.deepseek.DeepseekGraph` tensor by tensor (names, shapes, stored dtypes,
in the order they are written), so the size of an artifact is known before an hour is spent exporting
it, and the free space can be checked first. ``tests/test_plan.py`` holds it to real exports.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from moeport.models.config import DeepseekConfig

from .graph import ALIGN

ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "uint8": 1}
QUANTIZED = {"int8": 8, "int4": 4}
DEFAULT_BLOCK = {"int8": 128, "int4": 32}
# model.onnx: a few hundred nodes per layer; measured 17-25 KB per layer on the tiny and bench presets
GRAPH_BYTES_PER_LAYER = 32 << 10
GRAPH_BYTES_BASE = 64 << 10


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the artifact's weights file.

    ``use`` says how the graph reads it (what a backend may do with it): ``gemm`` a Linear weight
    (``Gemm`` of a Cast when stored narrower), ``matmul`` the absorbed ``kv_b_proj`` halves (``MatMul``
    of a Cast), ``experts`` a stack of routed experts (moeport's ``MoE``), ``quant`` codes or scales of
    a quantized Linear or expert stack, ``gather`` the embedding (``Gather``, then a Cast), ``tied`` the
    embedding when it is also the output head, ``fp32`` norms and the router (always float32).
    ``active`` is the fraction of it one decoded token reads."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    use: str
    active: float = 1.0
    bits: int = 0  # quantized codes: bits per weight

    @property
    def params(self) -> int:
        """Model parameters it stores (codes: numel * 8 / bits; scales: none)."""
        if self.use == "quant":
            return self.numel * 8 // self.bits if self.bits else 0
        return self.numel

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


def stored_tensors(cfg: DeepseekConfig, weights: str, block_size: int | None = None) -> list[StoredTensor]:
    """Every tensor ``moeport export --weights WEIGHTS`` writes for ``cfg``, in file order."""
    if weights not in ("fp32", "fp16", "bf16", *QUANTIZED):
        raise ValueError(f"weights {weights!r} is not one of fp32, fp16, bf16, int8, int4")
    quant = weights in QUANTIZED
    bits = QUANTIZED.get(weights, 0)
    block = (block_size or DEFAULT_BLOCK[weights]) if quant else 0
    storage = "bf16" if quant else weights
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    out: list[StoredTensor] = []

    def plain(name: str, shape: tuple[int, ...], use: str, active: float = 1.0) -> None:
        out.append(StoredTensor(name, shape, "fp32" if use == "fp32" else storage, use, active))

    def linear(name: str, n_out: int, n_in: int, min_bits: int = 0) -> None:
        if not quant or n_in % block:
            plain(name, (n_out, n_in), "gemm")
            return
        b = max(bits, min_bits)
        out.append(StoredTensor(name + ".codes", (n_out, n_in * b // 8), "uint8", "quant", bits=b))
        out.append(StoredTensor(name + ".scales", (n_out, n_in // block), "fp32", "quant"))

    def mlp(prefix: str, inter: int) -> None:
        linear(prefix + "gate_proj.weight", inter, h)
        linear(prefix + "up_proj.weight", inter, h)
        linear(prefix + "down_proj.weight", h, inter)

    if cfg.tie_word_embeddings:  # also the output head: read whole every token
        plain("model.embed_tokens.weight", (cfg.vocab_size, h), "tied")
    else:  # one row per token
        plain("model.embed_tokens.weight", (cfg.vocab_size, h), "gather", 1 / cfg.vocab_size)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        plain(p + "input_layernorm.weight", (h,), "fp32")
        if cfg.q_lora_rank is not None:
            linear(a + "q_a_proj.weight", cfg.q_lora_rank, h)
            plain(a + "q_a_layernorm.weight", (cfg.q_lora_rank,), "fp32")
            linear(a + "q_b_proj.weight", nh * cfg.qk_head_dim, cfg.q_lora_rank)
        else:
            linear(a + "q_proj.weight", nh * cfg.qk_head_dim, h)
        linear(a + "kv_a_proj_with_mqa.weight", cfg.latent_dim, h)
        plain(a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,), "fp32")
        plain(a + "kv_b_proj.weight:k", (nh, cfg.qk_nope_head_dim, cfg.kv_lora_rank), "matmul")
        plain(a + "kv_b_proj.weight:v", (nh, cfg.latent_dim, cfg.v_head_dim), "matmul")  # zero rows for rope dims
        linear(a + "o_proj.weight", h, nh * cfg.v_head_dim)
        plain(p + "post_attention_layernorm.weight", (h,), "fp32")
        m = p + "mlp."
        if not cfg.is_moe_layer(i):
            mlp(m, cfg.intermediate_size)
            continue
        e, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
        share = cfg.num_experts_per_tok / e
        plain(m + "gate.weight", (e, h), "fp32")
        if cfg.scoring_func == "sigmoid":
            plain(m + "gate.e_score_correction_bias", (e,), "fp32")
        if quant and h % block == 0 and inter % block == 0:
            for part, (n, k) in (("gate_up", (2 * inter, h)), ("down", (h, inter))):
                codes = (e, n, k * bits // 8)
                out.append(StoredTensor(f"{m}experts.{part}.codes", codes, "uint8", "quant", share, bits))
                out.append(StoredTensor(f"{m}experts.{part}.scales", (e, n, k // block), "fp32", "quant", share))
        else:
            plain(f"{m}experts.gate_up.weight", (e, 2 * inter, h), "experts", share)
            plain(f"{m}experts.down.weight", (e, h, inter), "experts", share)
        if cfg.n_shared_experts:
            mlp(m + "shared_experts.", inter * cfg.n_shared_experts)
    plain("model.norm.weight", (h,), "fp32")
    if not cfg.tie_word_embeddings:
        linear("lm_head.weight", cfg.vocab_size, h, min_bits=8)  # the head is kept at 8 bits or more
    return out


def weights_file_bytes(tensors: list[StoredTensor]) -> int:
    """Size of the external-data file: each tensor starts on a 4 KiB boundary (padding between, none after)."""
    if not tensors:
        return 0
    padded = sum(-(-t.nbytes // ALIGN) * ALIGN for t in tensors[:-1])
    return padded + tensors[-1].nbytes


def graph_bytes_estimate(cfg: DeepseekConfig) -> int:
    """An upper estimate of model.onnx (nodes and small constants; the weights are external)."""
    return GRAPH_BYTES_BASE + GRAPH_BYTES_PER_LAYER * cfg.num_hidden_layers


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
