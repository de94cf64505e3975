"""moeport's own operators (domain ``ai.moeport``), each with a reference decomposition in standard ONNX.

The artifact stays backend-neutral: a backend either keeps the reference (ONNX Runtime inlines the
model-local functions; other importers can inline them with ``onnx.inliner``) or rewrites the node
into its fast form (the cpu backend maps ``QLinear`` to ``com.microsoft.MatMulNBits`` and ``MoE`` /
``QMoE`` to ONNX Runtime's fused MoE kernels), reading the same weight bytes.

Operators (``x`` is ``[tokens, in]``):

``QLinear(x, codes, scales) -> [tokens, out]``
    ``y = x @ W^T`` with W ``[out, in]`` quantized symmetrically per block of ``block_size`` along
    ``in``: ``W[n, k] = (code[n, k] - 2^(bits-1)) * scales[n, k // block_size]``. ``codes`` is uint8
    ``[out, in * bits / 8]``; 4-bit codes are packed two per byte, the even ``k`` in the low nibble
    (the ONNX uint4 / MatMulNBits layout).

``MoE(x, expert_idx, expert_weights, gate_up, down) -> [tokens, hidden]``
    Routed experts only: ``sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with
    ``e = expert_idx[t, j]``. ``gate_up`` is ``[E, 2 * inter, hidden]`` with gate and up rows
    interleaved (row ``2i`` is gate row ``i``, row ``2i + 1`` up row ``i``), ``down`` is
    ``[E, hidden, inter]``. The reference gathers the chosen experts' weights, so it reads no other
    expert (and a token's result does not depend on the other tokens).

``QMoE(x, expert_idx, expert_weights, gate_up_codes, gate_up_scales, down_codes, down_scales)``
    The same with both expert weights quantized as in ``QLinear``.

``LatentAttention(q, past, new, allowed, scale) -> [B, H, S, D]``
    MLA attention in its absorbed form, over the latent cache: every latent row (``D`` =
    kv_lora_rank + qk_rope_head_dim values) is the key and the value of all heads. ``q`` is
    ``[B, H, S, D]`` (the absorbed queries), ``past`` ``[B, P, D]`` the cache, ``new`` ``[B, S, D]`` this
    step's rows, ``allowed`` bool ``[B, 1, S, P + S]`` which keys each query may see, ``scale`` a float
    scalar: ``softmax(where(allowed, scale * q . [past | new]^T, lowest)) . [past | new]``. The reference
    attends over past and new separately and joins the scores, so the cache is never copied; a query
    that may see no key gets the mean of all rows (softmax of equal scores).
"""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "ai.moeport"
OPSET = 18

_QUANTIZED = re.compile(r"^(QLinear|QMoE)_b(\d+)_bs(\d+)$")


def op_type(kind: str, bits: int = 0, block_size: int = 0) -> str:
    """The op_type of one of moeport's operators: ``MoE``, or ``QLinear``/``QMoE`` with their format."""
    return f"{kind}_b{bits}_bs{block_size}" if bits else kind


def parse_op_type(name: str) -> tuple[str, int, int]:
    """Inverse of :func:`op_type`: (kind, bits, block size); bits and block size are 0 for float ops."""
    m = _QUANTIZED.match(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else (name, 0, 0)


def top_k_constant(producer: onnx.NodeProto | None, initializers: dict[str, onnx.TensorProto]) -> int | None:
    """The constant k of the TopK node that produced a MoE operator's expert indices (None if not one)."""
    if producer is None or producer.op_type != "TopK" or producer.input[1] not in initializers:
        return None
    return int(onnx.numpy_helper.to_array(initializers[producer.input[1]]).reshape(-1)[0])


_SCALE_FACTORS = {4: (1.0, 0.95, 0.9, 0.85, 0.8)}  # scale candidates: f * absmax / qmax (else absmax / qmax)
_CHUNK = 1 << 16  # values quantized at a time: a few float32 temporaries of this size stay in the L2 cache


def quantize_blocks(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantization of ``w`` [..., K] along K: (uint8 codes [..., K*bits/8], scales [..., K/bs]).

    Each block's scale is chosen among a few candidates around absmax/qmax to minimise the squared
    error (as llama.cpp's quantizers do), which matters most at 4 bits.

    Every block is quantized on its own, in float32, so quantizing any split of the rows gives the
    same bits as quantizing the whole tensor (the exporter quantizes big tensors slice by slice). The
    work goes a few rows at a time, in reused buffers that stay in cache.
    """
    *lead, k = w.shape
    if k % block_size:
        raise ValueError(f"in-dimension {k} is not a multiple of block size {block_size}")
    qmax = 2 ** (bits - 1) - 1
    nb = k // block_size
    rows = math.prod(lead)
    blocks_all = w.reshape(rows, nb, block_size)
    codes = np.empty((rows, k * bits // 8), np.uint8)
    scales = np.empty((rows, nb), np.float32)
    step = max(1, _CHUNK // max(k, 1))
    t, e = np.empty((2, min(step, rows), nb, block_size), np.float32)
    factors = _SCALE_FACTORS.get(bits, ())
    for r0 in range(0, rows, step):
        n = min(rows, r0 + step) - r0
        blocks = np.asarray(blocks_all[r0 : r0 + n], dtype=np.float32)
        q, err_buf = t[:n], e[:n]
        amax = np.abs(blocks).max(axis=-1, keepdims=True)
        amax[amax == 0] = 1.0
        best_scale, best_err = amax / qmax, None  # the only candidate unless bits has more factors
        for f in factors:
            scale = amax * f
            scale /= qmax
            _round_clip(blocks, scale, qmax, q)
            np.multiply(q, scale, out=err_buf)
            err_buf -= blocks
            np.square(err_buf, out=err_buf)
            err = err_buf.sum(axis=-1, keepdims=True)
            if best_err is None:
                best_scale, best_err = scale, err
            else:
                better = err < best_err
                best_scale = np.where(better, scale, best_scale)
                np.minimum(err, best_err, out=best_err)
        _round_clip(blocks, best_scale, qmax, q)
        q += 2 ** (bits - 1)  # small integers: exact in float32
        c = q.reshape(n, k).astype(np.uint8)
        if bits == 4:
            np.bitwise_or(c[:, 0::2], c[:, 1::2] << 4, out=codes[r0 : r0 + n])
        else:
            codes[r0 : r0 + n] = c
        scales[r0 : r0 + n] = best_scale[..., 0]
    return codes.reshape(*lead, k * bits // 8), scales.reshape(*lead, nb)


def _round_clip(blocks: np.ndarray, scale: np.ndarray, qmax: int, out: np.ndarray) -> None:
    """``out = clip(round(blocks / scale), -qmax - 1, qmax)`` (round half to even), in place."""
    np.divide(blocks, scale, out=out)
    np.rint(out, out=out)
    np.clip(out, -qmax - 1, qmax, out=out)


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Inverse of :func:`quantize_blocks` (numpy; for tests and checks)."""
    if bits == 4:
        codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    q = codes.astype(np.float32) - 2 ** (bits - 1)
    *lead, k = q.shape
    return (q.reshape(*lead, k // block_size, block_size) * scales[..., None]).reshape(*lead, k)


class _Body:
    """Collects the nodes of a function body (constants become Constant nodes)."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self.n = 0

    def __call__(self, op: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        outs = [f"{self.prefix}_{op}_{self.n}_{i}" for i in range(outputs)]
        self.n += 1
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self("Constant", value=onnx.numpy_helper.from_array(arr))


def _dequantize(f: _Body, codes: str, scales: str, bits: int, block_size: int) -> str:
    """codes [..., K*bits/8] uint8, scales [..., K/bs] -> float weights [..., K]."""
    if bits == 4:
        lo = f("BitwiseAnd", codes, f.const(15, np.uint8))
        hi = f("BitShift", codes, f.const(4, np.uint8), direction="RIGHT")
        last = f.const([-1])
        pairs = f("Concat", f("Unsqueeze", lo, last), f("Unsqueeze", hi, last), axis=-1)  # [..., K/2, 2]
        shape = f("Concat", f("Slice", f("Shape", codes), f.const([0]), f.const([-1])), f.const([-1]), axis=0)
        codes = f("Reshape", pairs, shape)  # [..., K]
    q = f("Sub", f("Cast", codes, to=TensorProto.FLOAT), f.const(2.0 ** (bits - 1), np.float32))
    lead = f("Shape", scales)  # [..., K/bs]
    blocked = f("Reshape", q, f("Concat", lead, f.const([block_size]), axis=0))
    w = f("Mul", blocked, f("Unsqueeze", scales, f.const([-1])))
    return f("Reshape", w, f("Concat", f("Slice", lead, f.const([0]), f.const([-1])), f.const([-1]), axis=0))


def qlinear_function(name: str, bits: int, block_size: int) -> onnx.FunctionProto:
    f = _Body("ql")
    w = _dequantize(f, "codes", "scales", bits, block_size)
    f.nodes.append(helper.make_node("Gemm", ["x", w], ["y"], transB=1))
    return helper.make_function(
        DOMAIN, name, ["x", "codes", "scales"], ["y"], f.nodes, [helper.make_opsetid("", OPSET)]
    )


def _experts(f: _Body, gate_up: str, down: str) -> list[onnx.NodeProto]:
    """The chosen experts' weights (gate_up [N*k, 2I, H], down [N*k, H, I]) -> weighted sum per token."""
    flat_shape = f(
        "Concat", f.const([-1]), f("Slice", f("Shape", "x"), f.const([1]), f.const([2])), f.const([1]), axis=0
    )  # [-1, H, 1]
    k = f("Slice", f("Shape", "expert_idx"), f.const([1]), f.const([2]))
    n = f("Slice", f("Shape", "x"), f.const([0]), f.const([1]))
    xk = f("Expand", f("Unsqueeze", "x", f.const([1])), f("Concat", n, k, f.const([1]), axis=0))  # [N, k, H]
    h = f("MatMul", gate_up, f("Reshape", xk, flat_shape))  # [N*k, 2I, 1]
    two_i = f("Slice", f("Shape", h), f.const([1]), f.const([2]))
    gate = f("Slice", h, f.const([0]), two_i, f.const([1]), f.const([2]))
    up = f("Slice", h, f.const([1]), two_i, f.const([1]), f.const([2]))
    act = f("Mul", f("Mul", gate, f("Sigmoid", gate)), up)  # [N*k, I, 1]
    y = f("Reshape", f("MatMul", down, act), f("Concat", n, k, f.const([-1]), axis=0))  # [N, k, H]
    y = f("Mul", y, f("Unsqueeze", "expert_weights", f.const([-1])))
    f.nodes.append(helper.make_node("ReduceSum", [y, f.const([1])], ["y"], keepdims=0))
    return f.nodes


def latent_attention_function() -> onnx.FunctionProto:
    f = _Body("attn")
    one, last = f.const([1]), f.const([-1])
    past, new = f("Unsqueeze", "past", one), f("Unsqueeze", "new", one)  # [B, 1, P|S, D]: one key/value "head"
    scores = f(
        "Concat",
        f("MatMul", "q", f("Transpose", past, perm=[0, 1, 3, 2])),
        f("MatMul", "q", f("Transpose", new, perm=[0, 1, 3, 2])),
        axis=-1,
    )  # [B, H, S, P + S]
    scores = f("Where", "allowed", f("Mul", scores, "scale"), f.const(np.finfo(np.float32).min, np.float32))
    probs = f("Softmax", scores, axis=-1)
    past_len = f("Slice", f("Shape", "past"), one, f.const([2]))
    probs_past = f("Slice", probs, f.const([0]), past_len, last)
    probs_new = f("Slice", probs, past_len, f.const([np.iinfo(np.int64).max]), last)
    f.nodes.append(helper.make_node("Add", [f("MatMul", probs_past, past), f("MatMul", probs_new, new)], ["y"]))
    return helper.make_function(
        DOMAIN,
        "LatentAttention",
        ["q", "past", "new", "allowed", "scale"],
        ["y"],
        f.nodes,
        [helper.make_opsetid("", OPSET)],
    )


def moe_function(name: str) -> onnx.FunctionProto:
    f = _Body("moe")
    flat = f("Reshape", "expert_idx", f.const([-1]))
    nodes = _experts(f, f("Gather", "gate_up", flat, axis=0), f("Gather", "down", flat, axis=0))
    return helper.make_function(
        DOMAIN,
        name,
        ["x", "expert_idx", "expert_weights", "gate_up", "down"],
        ["y"],
        nodes,
        [helper.make_opsetid("", OPSET)],
    )


def qmoe_function(name: str, bits: int, block_size: int) -> onnx.FunctionProto:
    f = _Body("qmoe")
    flat = f("Reshape", "expert_idx", f.const([-1]))

    def chosen(codes: str, scales: str) -> str:  # only the chosen experts are dequantized
        return _dequantize(f, f("Gather", codes, flat, axis=0), f("Gather", scales, flat, axis=0), bits, block_size)

    nodes = _experts(f, chosen("gate_up_codes", "gate_up_scales"), chosen("down_codes", "down_scales"))
    return helper.make_function(
        DOMAIN,
        name,
        ["x", "expert_idx", "expert_weights", "gate_up_codes", "gate_up_scales", "down_codes", "down_scales"],
        ["y"],
        nodes,
        [helper.make_opsetid("", OPSET)],
    )
