"""DeepSeek-V2/V3 written once against the exporter's graph builder.

One graph serves prefill and decode: it takes ``input_ids``/``position_ids`` for the new tokens, an
``attention_mask`` over past + new positions, ``logits_to_keep`` and one latent cache per layer
(``past_latent.{i}``: ``[batch, past, kv_lora_rank + qk_rope_head_dim]``), and returns ``logits`` for
the last ``logits_to_keep`` new positions plus ``new_latent.{i}``: only the new tokens' cache rows,
which the runtime writes into its own buffers. The cache is read in place, never copied by the graph.

Attention is MLA in its "absorbed" form: ``kv_b_proj`` is split per head into the key part, folded
into the query (``q_nope @ W_uk``), and the value part, applied after attending over the latent
(``(probs @ latent) @ W_uv^T``). Keys and values are never expanded to full heads, so the cache is
only the latent. The rotary part uses DeepSeek's interleaved pair layout (or rotate-half when
``rope_interleave`` is false); both are the same formula on a different split of the dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

import numpy as np
from onnx import TensorProto

from .config import DeepseekConfig

if TYPE_CHECKING:  # the builder lives in the exporter; models only describe the computation
    from moeport.exporter.graph import GraphBuilder


class WeightSource(Protocol):
    """Where the graph's weights come from: checkpoint tensors as float32, read in row slices."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape."""

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` (all by default) of the tensor, as float32."""

    def slices(self, name: str, share: int = 1) -> list[tuple[int, int]]:
        """Row ranges covering the tensor, each small enough that ``share`` such float32 slices fit
        the export's memory budget for one slice."""


CACHE_INPUT = "past_latent.{}"
CACHE_OUTPUT = "new_latent.{}"


# --------------------------------------------------------------------------------------------------
# weight names


def expected_tensors(cfg: DeepseekConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the model reads, with its shape (Hugging Face names)."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    t: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (h,)
        t[p + "post_attention_layernorm.weight"] = (h,)
        a = p + "self_attn."
        if cfg.q_lora_rank is not None:
            t[a + "q_a_proj.weight"] = (cfg.q_lora_rank, h)
            t[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            t[a + "q_b_proj.weight"] = (nh * cfg.qk_head_dim, cfg.q_lora_rank)
        else:
            t[a + "q_proj.weight"] = (nh * cfg.qk_head_dim, h)
        t[a + "kv_a_proj_with_mqa.weight"] = (cfg.latent_dim, h)
        t[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        t[a + "kv_b_proj.weight"] = (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        t[a + "o_proj.weight"] = (h, nh * cfg.v_head_dim)
        m = p + "mlp."
        if cfg.is_moe_layer(i):
            t[m + "gate.weight"] = (cfg.n_routed_experts, h)
            if cfg.model_type == "deepseek_v3":
                t[m + "gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
            inter = cfg.moe_intermediate_size
            for e in range(cfg.n_routed_experts):
                _mlp_names(t, f"{m}experts.{e}.", h, inter)
            if cfg.n_shared_experts:
                _mlp_names(t, m + "shared_experts.", h, inter * cfg.n_shared_experts)
        else:
            _mlp_names(t, m, h, cfg.intermediate_size)
    return t


def _mlp_names(t: dict[str, tuple[int, ...]], prefix: str, hidden: int, inter: int) -> None:
    t[prefix + "gate_proj.weight"] = (inter, hidden)
    t[prefix + "up_proj.weight"] = (inter, hidden)
    t[prefix + "down_proj.weight"] = (hidden, inter)


# --------------------------------------------------------------------------------------------------
# rotary embedding (float32, mirroring transformers' computation so results agree bit for bit)


def rope_inv_freq(cfg: DeepseekConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies for the rope dims and the factor applied to cos/sin (YaRN's mscale)."""
    dim, rope = cfg.qk_rope_head_dim, cfg.rope
    base = np.float32(rope.theta)
    pos_freqs = (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    if rope.rope_type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _mscale(factor, rope.mscale) / _mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1
    orig = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = (np.float32(1) - ramp).astype(np.float32)
    inv_extra = (np.float32(1.0) / pos_freqs).astype(np.float32)
    inv_inter = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv = inv_inter * (np.float32(1) - extrapolation_factor) + inv_extra * extrapolation_factor
    return inv.astype(np.float32), float(attention_factor)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# --------------------------------------------------------------------------------------------------
# the graph


class DeepseekGraph:
    """Emits the DeepSeek forward pass into a :class:`GraphBuilder`, reading weights as it goes."""

    def __init__(
        self, cfg: DeepseekConfig, b: GraphBuilder, source: WeightSource, quant: tuple[int, int] | None = None
    ):
        """``quant`` = (bits, block_size) stores every Linear's weight block-quantized (weight-only).

        Every weight is read, converted or quantized, and written in row slices (``source.slices``),
        so memory does not grow with the size of a tensor; the artifact's bytes do not depend on how
        the rows are split (quantization works block by block within a row)."""
        self.cfg, self.b, self.src = cfg, b, source
        self.quant = quant
        self.unquantized: list[str] = []  # Linear weights whose in-dimension the block size does not divide

    def _parts(self, name: str) -> list[Callable[[], np.ndarray]]:
        """One reader per row slice of a checkpoint tensor, in order."""
        return [partial(self.src.read, name, start, stop) for start, stop in self.src.slices(name)]

    # -- building blocks ----------------------------------------------------------------------
    def weight(self, name: str, keep_fp32: bool = False, cast: bool = True) -> str:
        return self.b.weight_stack(name, self._parts(name), self.src.shape(name), keep_fp32=keep_fp32, cast=cast)

    def linear(self, x: str, name: str, min_bits: int = 0) -> str:
        """``x @ W^T`` with W in the checkpoint's [out, in] layout; x is 2-D [tokens, in]."""
        b = self.b
        if self.quant is None:
            return b.Gemm(x, self.weight(name), transB=1)
        bits, block = max(self.quant[0], min_bits), self.quant[1]
        shape = self.src.shape(name)
        if shape[1] % block:
            self.unquantized.append(name)
            return b.Gemm(x, self.weight(name), transB=1)
        codes, scales = self._quantized(name, self._parts(name), shape, bits)
        return b.qlinear(x, codes, scales, bits, block)

    def _quantized(
        self, name: str, parts: list[Callable[[], np.ndarray]], shape: tuple[int, ...], bits: int
    ) -> tuple[str, str]:
        """Quantize a weight [..., N, K] given as consecutive row slices (see GraphBuilder.quantized)."""
        return self.b.quantized(name, parts, shape, bits, self.quant[1])

    def rms_norm(self, x: str, name: str) -> str:
        """``w * x / sqrt(mean(x^2) + eps)``, in the op pattern runtimes fuse into one RMSNorm kernel."""
        b = self.b
        w = self.weight(name, keep_fp32=True)
        var = b.ReduceMean(b.Pow(x, b.const(2.0, np.float32)), b.const([-1], np.int64), keepdims=1)
        return b.Mul(w, b.Div(x, b.Sqrt(b.Add(var, b.const(self.cfg.rms_norm_eps, np.float32)))))

    def silu(self, x: str) -> str:
        return self.b.Mul(x, self.b.Sigmoid(x))

    def mlp(self, x: str, prefix: str) -> str:
        b = self.b
        gate = self.linear(x, prefix + "gate_proj.weight")
        up = self.linear(x, prefix + "up_proj.weight")
        return self.linear(b.Mul(self.silu(gate), up), prefix + "down_proj.weight")

    def rope(self, x: str, cos: str, sin: str) -> str:
        """Rotate pairs of the last dim: (x[2i], x[2i+1]) if interleaved, else (x[i], x[i + d/2])."""
        b, d = self.b, self.cfg.qk_rope_head_dim
        axes = b.const([-1], np.int64)
        if self.cfg.rope_interleave:
            step = b.const([2], np.int64)
            x1 = b.Slice(x, b.const([0], np.int64), b.const([d], np.int64), axes, step)
            x2 = b.Slice(x, b.const([1], np.int64), b.const([d], np.int64), axes, step)
        else:
            x1 = b.Slice(x, b.const([0], np.int64), b.const([d // 2], np.int64), axes)
            x2 = b.Slice(x, b.const([d // 2], np.int64), b.const([d], np.int64), axes)
        return b.Concat(b.Sub(b.Mul(x1, cos), b.Mul(x2, sin)), b.Add(b.Mul(x2, cos), b.Mul(x1, sin)), axis=-1)

    # -- attention ----------------------------------------------------------------------------
    def attention(self, x: str, layer: int, ctx: dict[str, str]) -> str:
        cfg, b = self.cfg, self.b
        a = f"model.layers.{layer}.self_attn."
        nh, nope, r, v, kvl = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        i64 = np.int64
        if cfg.q_lora_rank is not None:
            q = self.linear(
                self.rms_norm(self.linear(x, a + "q_a_proj.weight"), a + "q_a_layernorm.weight"), a + "q_b_proj.weight"
            )
        else:
            q = self.linear(x, a + "q_proj.weight")
        q = b.Transpose(
            b.Reshape(q, b.Concat(ctx["bs"], b.const([nh, cfg.qk_head_dim], i64), axis=0)), perm=[0, 2, 1, 3]
        )  # [B, nh, S, dq]
        q_nope, q_rot = b.Split(q, b.const([nope, r], i64), axis=-1, outputs=2)
        q_rot = self.rope(q_rot, ctx["cos4"], ctx["sin4"])

        ckv = self.linear(x, a + "kv_a_proj_with_mqa.weight")  # [N, kvl + r]
        c, k_rot = b.Split(ckv, b.const([kvl, r], i64), axis=-1, outputs=2)
        c = self.rms_norm(c, a + "kv_a_layernorm.weight")
        c = b.Reshape(c, b.Concat(ctx["bs"], b.const([kvl], i64), axis=0))
        k_rot = self.rope(b.Reshape(k_rot, b.Concat(ctx["bs"], b.const([r], i64), axis=0)), ctx["cos"], ctx["sin"])
        new_latent = b.Concat(c, k_rot, axis=-1)  # [B, S, D]: this step's rows of the latent cache
        b.output(new_latent, CACHE_OUTPUT.format(layer), TensorProto.FLOAT, ["batch", "seq", cfg.latent_dim])

        # kv_b_proj [nh*(nope+v), kvl] -> per head key part W_uk [nh, nope, kvl] and value part W_uv^T, padded
        # with zero rows for the rope dims ([nh, kvl + r, v]) so whole latent rows map straight to values
        kv_b = self.src.read(a + "kv_b_proj.weight").reshape(nh, nope + v, kvl)  # small: read whole
        w_uk = b.weight(a + "kv_b_proj.weight:k", kv_b[:, :nope, :])
        uv_t = np.zeros((nh, cfg.latent_dim, v), np.float32)
        uv_t[:, :kvl, :] = kv_b[:, nope:, :].transpose(0, 2, 1)
        w_uv_t = b.weight(a + "kv_b_proj.weight:v", uv_t)
        del kv_b, uv_t

        # attend over the latent rows [past | new] (the cache is read in place, never joined with the new rows)
        q_full = b.Concat(b.MatMul(q_nope, w_uk), q_rot, axis=-1)  # [B, nh, S, D]
        ctx_rows = b.latent_attention(
            q_full, CACHE_INPUT.format(layer), new_latent, ctx["allowed"], cfg.softmax_scale()
        )  # [B, nh, S, D]
        out = b.MatMul(ctx_rows, w_uv_t)  # [B, nh, S, v]
        out = b.Reshape(b.Transpose(out, perm=[0, 2, 1, 3]), b.const([-1, nh * v], i64))
        return self.linear(out, a + "o_proj.weight")

    # -- mixture of experts -------------------------------------------------------------------
    def route(self, x: str, m: str) -> tuple[str, str, str]:
        """(expert indices [N, k] int64, routing weights [N, k] float32, router logits [N, E]) as transformers."""
        cfg, b = self.cfg, self.b
        i64 = np.int64
        e, g, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        logits = b.Gemm(x, self.weight(m + "gate.weight", keep_fp32=True), transB=1)  # [N, E]
        if cfg.scoring_func == "sigmoid":
            scores = b.Sigmoid(logits)
            choice = b.Add(scores, self.weight(m + "gate.e_score_correction_bias", keep_fp32=True))
            grouped = b.Reshape(choice, b.const([-1, g, e // g], i64))
            top2 = b.TopK(grouped, b.const([min(2, e // g)], i64), axis=-1, outputs=2)[0]
            group_scores = b.ReduceSum(top2, b.const([-1], i64), keepdims=0)
            choice = b.Where(self._group_mask(group_scores, grouped), choice, b.const(-np.inf, np.float32))
            idx = b.TopK(choice, b.const([k], i64), axis=-1, outputs=2)[1]
            weights = b.GatherElements(scores, idx, axis=1)
            if cfg.norm_topk_prob:
                denom = b.Add(b.ReduceSum(weights, b.const([-1], i64), keepdims=1), b.const(1e-20, np.float32))
                weights = b.Div(weights, denom)
        else:
            scores = b.Softmax(logits, axis=-1)
            if cfg.topk_method == "group_limited_greedy":
                grouped = b.Reshape(scores, b.const([-1, g, e // g], i64))
                group_scores = b.ReduceMax(grouped, b.const([-1], i64), keepdims=0)
                scores = b.Where(self._group_mask(group_scores, grouped), scores, b.const(0.0, np.float32))
            weights, idx = b.TopK(scores, b.const([k], i64), axis=-1, outputs=2)
        weights = b.Mul(weights, b.const(cfg.routed_scaling_factor, np.float32))
        return idx, weights, logits

    def _group_mask(self, group_scores: str, grouped: str) -> str:
        """Bool [N, E]: experts whose group is among the topk_group best groups."""
        b, cfg = self.b, self.cfg
        i64 = np.int64
        group_idx = b.TopK(group_scores, b.const([cfg.topk_group], i64), axis=-1, outputs=2)[1]
        ones = b.ConstantOfShape(b.Shape(group_idx), value=_tensor_1(1.0))
        zeros = b.ConstantOfShape(b.Shape(group_scores), value=_tensor_1(0.0))
        group_mask = b.ScatterElements(zeros, group_idx, ones, axis=1)  # [N, G]
        expert_mask = b.Expand(b.Unsqueeze(group_mask, b.const([2], i64)), b.Shape(grouped))
        return b.Cast(b.Reshape(expert_mask, b.const([-1, cfg.n_routed_experts], i64)), to=TensorProto.BOOL)

    def moe(self, x: str, layer: int) -> str:
        """DeepSeekMoE: routing in plain ops, then moeport's MoE operator over the routed experts only."""
        cfg, b = self.cfg, self.b
        m = f"model.layers.{layer}.mlp."
        idx, weights, _ = self.route(x, m)
        e, h, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size

        def expert(j: int, proj: str) -> str:
            return f"{m}experts.{j}.{proj}.weight"

        def gate_up(j: int, start: int, stop: int) -> np.ndarray:  # rows of [2I, H], gate and up interleaved
            gate = self.src.read(expert(j, "gate_proj"), start, stop)
            up = self.src.read(expert(j, "up_proj"), start, stop)
            return np.stack([gate, up], axis=1).reshape(2 * (stop - start), h)

        gu_parts = [partial(gate_up, j, *r) for j in range(e) for r in self.src.slices(expert(j, "gate_proj"), share=4)]
        down_parts = [part for j in range(e) for part in self._parts(expert(j, "down_proj"))]
        if self.quant and h % self.quant[1] == 0 and inter % self.quant[1] == 0:
            bits, block = self.quant
            gu = self._quantized(f"{m}experts.gate_up", gu_parts, (e, 2 * inter, h), bits)
            down = self._quantized(f"{m}experts.down", down_parts, (e, h, inter), bits)
            out = b.qmoe(x, idx, weights, *gu, *down, bits=bits, block=block)
        else:
            if self.quant:
                self.unquantized.append(f"{m}experts")
            gu = b.weight_stack(f"{m}experts.gate_up.weight", gu_parts, (e, 2 * inter, h))
            down = b.weight_stack(f"{m}experts.down.weight", down_parts, (e, h, inter))
            out = b.moe(x, idx, weights, gu, down)
        if cfg.n_shared_experts:
            out = b.Add(out, self.mlp(x, m + "shared_experts."))
        return out

    # -- whole model --------------------------------------------------------------------------
    def build(self) -> None:
        cfg, b = self.cfg, self.b
        i64 = np.int64
        fp = TensorProto.FLOAT
        b.input("input_ids", TensorProto.INT64, ["batch", "seq"])
        b.input("position_ids", TensorProto.INT64, ["batch", "seq"])
        b.input("attention_mask", TensorProto.INT64, ["batch", "total"])
        b.input("logits_to_keep", TensorProto.INT64, [1])
        for i in range(cfg.num_hidden_layers):
            b.input(CACHE_INPUT.format(i), fp, ["batch", "past", cfg.latent_dim])

        ctx = self._context()
        embed = self.weight("model.embed_tokens.weight", cast=False)
        x = b.Gather(embed, "input_ids", axis=0)  # [B, S, H]
        if b.storage != np.float32:
            x = b.Cast(x, to=fp)
        x = b.Reshape(x, b.const([-1, cfg.hidden_size], i64))  # [N, H]

        for i in range(cfg.num_hidden_layers):
            with b.scope(f"layer{i}"):
                p = f"model.layers.{i}."
                x = b.Add(x, self.attention(self.rms_norm(x, p + "input_layernorm.weight"), i, ctx))
                h = self.rms_norm(x, p + "post_attention_layernorm.weight")
                x = b.Add(x, self.moe(h, i) if cfg.is_moe_layer(i) else self.mlp(h, p + "mlp."))

        # only the last `logits_to_keep` positions of each row reach the head (1 when generating)
        h = cfg.hidden_size
        x = b.Reshape(x, b.Concat(ctx["bs"], b.const([h], i64), axis=0))
        x = b.Slice(x, b.Neg("logits_to_keep"), b.const([np.iinfo(np.int64).max], i64), b.const([1], i64))
        x = self.rms_norm(b.Reshape(x, b.const([-1, h], i64)), "model.norm.weight")
        if cfg.tie_word_embeddings:
            head = embed if b.storage == np.float32 else b.Cast(embed, to=fp)
            logits = b.Gemm(x, head, transB=1)
        else:  # the output layer is kept at 8 bits or more, as llama.cpp does for its 4-bit types
            logits = self.linear(x, "lm_head.weight", min_bits=8)
        batch = b.Slice(ctx["bs"], b.const([0], i64), b.const([1], i64))
        logits = b.Reshape(logits, b.Concat(batch, b.const([-1, cfg.vocab_size], i64), axis=0))
        b.output(logits, "logits", fp, ["batch", "kept", cfg.vocab_size])
        b.outputs.sort(key=lambda v: v.name != "logits")  # logits first, then the caches in layer order

    def _context(self) -> dict[str, str]:
        """Values shared by every layer: shapes, rotary cos/sin, the attention mask."""
        b, cfg = self.b, self.cfg
        i64 = np.int64
        bs = b.Shape("input_ids")  # [B, S]
        inv_freq, attention_factor = rope_inv_freq(cfg)
        pos = b.Unsqueeze(b.Cast("position_ids", to=TensorProto.FLOAT), b.const([-1], i64))  # [B, S, 1]
        freqs = b.Mul(pos, b.const(inv_freq))  # [B, S, r/2]
        cos, sin = b.Cos(freqs), b.Sin(freqs)
        if attention_factor != 1.0:
            af = b.const(attention_factor, np.float32)
            cos, sin = b.Mul(cos, af), b.Mul(sin, af)
        one = b.const([1], i64)

        total = b.Gather(b.Shape("attention_mask"), b.const(1, i64), axis=0)
        seq = b.Gather(bs, b.const(1, i64), axis=0)
        k_idx = b.Range(b.const(0, i64), total, b.const(1, i64))
        q_idx = b.Range(b.Sub(total, seq), total, b.const(1, i64))
        causal = b.LessOrEqual(b.Unsqueeze(k_idx, b.const([0], i64)), b.Unsqueeze(q_idx, one))  # [S, T]
        keep = b.Cast(b.Unsqueeze("attention_mask", b.const([1, 2], i64)), to=TensorProto.BOOL)  # [B, 1, 1, T]
        allowed = b.And(causal, keep)  # [B, 1, S, T]
        return dict(
            bs=bs,
            cos=cos,
            sin=sin,
            cos4=b.Unsqueeze(cos, one),
            sin4=b.Unsqueeze(sin, one),
            allowed=allowed,
        )


def _tensor_1(value: float):
    from onnx import helper

    return helper.make_tensor("value", TensorProto.FLOAT, [1], [value])
