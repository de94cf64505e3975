"""Ascend-style NPU backends: static-shape half-precision graphs, a fixed-capacity latent cache.

NPUs such as Ascend compile fixed-shape graphs ahead of time (ONNX Runtime's CANN execution provider
rebuilds its offline model for every new input shape), so the neutral artifact is specialized into a
few graphs whose every tensor has a static shape:

- one **decode** graph (1 new token) and one **prefill** graph per bucket (default 32/128/512 new
  tokens). A prompt is right-aligned in the smallest bucket that holds it (padding is masked out);
  a longer one is prefilled in chunks of the largest bucket.
- the latent cache is a **fixed-capacity** buffer ``[1, capacity, kv_lora + rope]`` per layer, given
  to every graph whole and read through the attention mask (rows past the sequence are masked); the
  graphs return the new rows, which are written at the sequence's position. No shape depends on data
  and no graph has NonZero/Loop/If.
- **MoE with static shapes**: a graph whose tokens × top-k is at most the number of experts gathers
  the chosen experts' weights by index (decode reads only the routed experts); a larger one (prefill)
  runs every expert on every token and weights each result by its routing weight, which is zero for
  unrouted experts (exact, never a dropped token, each expert's weights read once).
- **half precision** (float16, or bfloat16 with ``dtype=bfloat16``): weights, activations and the
  cache; the numerically delicate parts stay float32 as mixed-precision NPU deployments keep them:
  RMSNorm statistics, softmax, the router (gate, sigmoid/softmax, top-k) and the rotary angles.
  Quantized artifacts are dequantized to half precision at compile time.

Every node is checked against ``cann_ops.json`` (operators, opsets and dtypes the CANN execution
provider supports, with its sources); anything else stops the compile naming the operator and layer.

Two backends share the graphs: ``npu`` runs them on ONNX Runtime's ``CANNExecutionProvider``
(``onnxruntime-cann``), ``npu-sim`` on the CPU execution provider, so the lowering is checked on any
machine: half-precision values between operators exactly as on the device; operators that have no
half-precision CPU kernel compute in float32 between casts (as Ascend's cube units accumulate float16
products in float32).

Compiled graphs are cached in ``<artifact>/compiled/npu-<key>/`` (one shared weights file).
"""

from __future__ import annotations

import ctypes.util
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moeport.exporter.manifest import Artifact, ArtifactError, VerifiedFiles, sha256_file
from moeport.exporter.ops import (
    DOMAIN,
    dequantize_blocks,
    latent_attention_function,
    moe_function,
    parse_op_type,
    top_k_constant,
)

from . import trust
from .base import API_VERSION, Availability, BackendError, flag
from .cpu import session_options, set_nodes

log = logging.getLogger("moeport.npu")

DEFAULT_BUCKETS = (32, 128, 512)
COVERAGE_FILE = Path(__file__).with_name("cann_ops.json")
_SPEC_VERSION = 1  # bump when the specialization below changes (invalidates cached graphs)
PRECISION_MODES = (
    "force_fp32",
    "cube_fp16in_fp32out",
    "force_fp16",
    "allow_fp32_to_fp16",
    "must_keep_origin_dtype",
    "allow_mix_precision",
    "allow_mix_precision_fp16",
)
_HALF = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
_DYNAMIC_OPS = {"NonZero", "Loop", "If", "Scan", "Unique", "Compress"}
# operators computed in float32 even in a half-precision graph (statistics, softmax, routing, angles)
HALF, F32, KEEP = "half", "f32", "keep"
_FP32_OPS = {"Softmax", "Pow", "ReduceMean", "Sqrt", "Div", "Sigmoid", "TopK", "Cos", "Sin"}


# --------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class NpuSettings:
    buckets: tuple[int, ...]
    capacity: int
    dtype: str
    device_id: int
    npu_mem_limit: int | None
    precision_mode: str
    enable_cann_graph: bool

    def key_fields(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "capacity": self.capacity, "dtype": self.dtype}


def parse_buckets(value: Any) -> tuple[int, ...]:
    """``"32,128,512"`` or a sequence of ints -> a validated, strictly increasing tuple."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise BackendError(f"npu: buckets must be a comma-separated list of sizes, got {value!r}")
    if not parts:
        raise BackendError("npu: the bucket list is empty; give at least one prefill size, e.g. 32,128,512")
    try:
        sizes = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise BackendError(f"npu: bucket sizes must be whole numbers, got {value!r}") from None
    if any(s < 1 for s in sizes):
        raise BackendError(f"npu: bucket sizes must be at least 1, got {value!r}")
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
        raise BackendError(f"npu: the bucket list must be strictly increasing, got {','.join(map(str, sizes))}")
    return sizes


def _int(value: Any, name: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BackendError(f"npu: {name} must be a whole number, got {value!r}") from None
    if number < minimum:
        raise BackendError(f"npu: {name} must be at least {minimum}, got {number}")
    return number


def settings_from(options: dict[str, Any], artifact: Artifact) -> NpuSettings:
    limit = artifact.max_seq_len
    capacity = _int(options.get("cache_capacity", limit), "cache_capacity", 2)
    if capacity > limit:
        raise BackendError(
            f"npu: cache capacity {capacity} is longer than the artifact's max sequence length {limit} "
            "(export again with a larger --max-seq-len)"
        )
    if options.get("buckets") is None:
        buckets = tuple(b for b in DEFAULT_BUCKETS if b < capacity) or (capacity - 1,)
    else:
        buckets = parse_buckets(options["buckets"])
        if buckets[-1] >= capacity:
            raise BackendError(
                f"npu: bucket {buckets[-1]} does not fit the cache capacity {capacity} (buckets must be smaller)"
            )
    dtype = str(options.get("dtype", "float16"))
    if dtype not in _HALF:
        raise BackendError(f"npu: dtype must be float16 or bfloat16, got {dtype!r}")
    precision = str(options.get("precision_mode", "must_keep_origin_dtype"))
    if precision not in PRECISION_MODES:
        raise BackendError(f"npu: unknown precision mode {precision!r}; one of {', '.join(PRECISION_MODES)}")
    mem = options.get("npu_mem_limit")
    return NpuSettings(
        buckets=buckets,
        capacity=capacity,
        dtype=dtype,
        device_id=_int(options.get("device_id", 0), "device_id", 0),
        npu_mem_limit=None if mem in (None, "", 0, "0") else _int(mem, "npu_mem_limit", 1),
        precision_mode=precision,
        enable_cann_graph=flag(options.get("enable_cann_graph", True), "enable_cann_graph", "npu"),
    )


# --------------------------------------------------------------------------------------------------
# specialization: neutral artifact -> one static-shape graph


def _array(t: TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t)


SMALL_TENSOR = 4096  # elements: smaller initializers are kept inline in each graph


class _Weights:
    """The large tensors of the graphs being specialized, kept out of the protos (which could not hold
    a real model, and would copy it per graph): each is a placeholder initializer (dtype, dims, external
    location ``moeport-lazy``) plus a function making its data, called only when the graphs are written.
    A placeholder's name says how its data is made (``W``, ``W:dequant``, ``W:dequant:T``, ``...:half``),
    so one name is one tensor in every graph and is stored once."""

    LAZY = "moeport-lazy"

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.make: dict[str, Any] = {}

    def lazy(self, t: TensorProto) -> bool:
        return t.data_location == TensorProto.EXTERNAL and any(
            e.key == "location" and e.value == self.LAZY for e in t.external_data
        )

    def placeholder(self, name: str, data_type: int, dims: Any, make) -> TensorProto:
        t = TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(int(d) for d in dims)
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", self.LAZY
        self.make.setdefault(name, make)
        return t

    def array(self, t: TensorProto) -> np.ndarray:
        if self.lazy(t):
            return self.make[t.name]()
        if t.data_location == TensorProto.EXTERNAL:  # the bytes of the artifact's verified weights file
            inline = TensorProto()
            inline.CopyFrom(t)
            self._inline(inline)
            return numpy_helper.to_array(inline)
        return numpy_helper.to_array(t)

    def _inline(self, t: TensorProto) -> None:
        t.raw_data = bytes(self.artifact.external_data(t))
        t.data_location = TensorProto.DEFAULT
        del t.external_data[:]

    def adopt(self, model: onnx.ModelProto) -> None:
        """The artifact's initializers: small ones read inline, large ones become lazy placeholders."""
        for t in model.graph.initializer:
            if t.data_location != TensorProto.EXTERNAL or self.lazy(t):
                continue
            if int(np.prod(t.dims)) <= SMALL_TENSOR:
                self._inline(t)
            else:
                source = TensorProto()
                source.CopyFrom(t)
                t.CopyFrom(self.placeholder(t.name, t.data_type, t.dims, lambda s=source: self.array(s)))

    def raw(self, t: TensorProto) -> bytes:
        arr = np.ascontiguousarray(self.make[t.name]())
        return (arr.view(np.uint16) if t.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) else arr).tobytes()


def _lower_moeport_ops(model: onnx.ModelProto, tokens: int, weights: _Weights) -> None:
    """Replace moeport's operators by float standard-op forms with static shapes (in place).

    Weights stored narrower than float32 (a Cast of an initializer) become float32 placeholders;
    QLinear -> Gemm on the dequantized weight; QMoE -> MoE on dequantized experts; MoE with
    tokens*k <= experts keeps its reference body (gathers the chosen experts), a larger one becomes
    the dense form: every expert on every token, results weighted by the (zero when unrouted) weights.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    new_nodes: list[onnx.NodeProto] = []
    added: dict[str, TensorProto] = {}
    renamed: dict[str, str] = {}
    count = [0]

    def fresh(hint: str) -> str:
        count[0] += 1
        return f"npu_{hint}_{count[0]}"

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        out = fresh(op)
        new_nodes.append(helper.make_node(op, inputs, [out], name=f"{name}/{op}_{count[0]}", **attrs))
        return out

    def const(value: Any, dtype: Any = np.int64) -> str:
        name = fresh("const")
        added[name] = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def derived(name: str, dims: Any, make) -> str:
        """A float32 placeholder made from other weights (e.g. ``W:dequant``)."""
        if name not in added:
            added[name] = weights.placeholder(name, TensorProto.FLOAT, dims, lambda: make().astype(np.float32))
        return name

    def dequantized(codes: str, scales: str, bits: int, block: int) -> str:
        c, sc = inits[codes], inits[scales]
        dims = [*c.dims[:-1], c.dims[-1] * 8 // bits]
        return derived(
            f"{codes}:dequant", dims, lambda: dequantize_blocks(weights.array(c), weights.array(sc), bits, block)
        )

    def source(name: str) -> TensorProto:
        return added[name] if name in added else inits[name]

    for n in g.node:
        n.input[:] = [renamed.get(v, v) for v in n.input]
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        if n.op_type == "Cast" and to == TensorProto.FLOAT and n.input[0] in inits:
            src = inits[n.input[0]]  # a weight stored as fp16/bf16: one float32 placeholder instead
            renamed[n.output[0]] = derived(f"{src.name}:float32", src.dims, lambda s=src: weights.array(s))
            continue
        if n.domain != DOMAIN:
            new_nodes.append(n)
            continue
        kind, bits, block = parse_op_type(n.op_type)
        if kind == "LatentAttention":  # its reference body is static once the shapes are pinned
            new_nodes.append(n)
            continue
        if kind == "QLinear":
            x, codes, scales = n.input
            w = dequantized(codes, scales, bits, block)
            new_nodes.append(helper.make_node("Gemm", [x, w], list(n.output), name=n.name, transB=1))
            continue
        if kind == "QMoE":
            x, idx, w, guc, gus, dc, ds = n.input
            gu, dn = dequantized(guc, gus, bits, block), dequantized(dc, ds, bits, block)
        elif kind == "MoE":
            x, idx, w, gu, dn = n.input
        else:
            raise BackendError(f"npu: no static lowering for moeport operator {n.op_type} ({n.name})")
        experts, two_i, _ = source(gu).dims
        k = top_k_constant(producers.get(idx), inits)
        if k is None:
            raise BackendError(f"npu: cannot find the number of experts per token behind {idx!r}")
        if tokens * k <= experts:  # gather the chosen experts: the reference body, on float weights
            new_nodes.append(helper.make_node("MoE", [x, idx, w, gu, dn], list(n.output), name=n.name, domain=DOMAIN))
            continue
        # dense, on the same weights as the gather form (no transposed copy): per expert
        # [E, 2I, N] = gate_up @ x^T; [E, H, N] = down @ act; y^T = sum_e weight[e, n] * y_e
        name = n.name
        x_t = node("Transpose", [x], name, perm=[1, 0])  # [H, N]
        h = node("MatMul", [gu, x_t], name)  # [E, 2I, N]
        gate = node("Slice", [h, const([0]), const([two_i]), const([1]), const([2])], name)
        up = node("Slice", [h, const([1]), const([two_i]), const([1]), const([2])], name)
        act = node("Mul", [node("Mul", [gate, node("Sigmoid", [gate], name)], name), up], name)  # [E, I, N]
        y = node("MatMul", [dn, act], name)  # [E, H, N]
        chosen = node("Equal", [node("Unsqueeze", [idx, const([-1])], name), const(np.arange(experts))], name)
        onehot = node("Cast", [chosen], name, to=TensorProto.FLOAT)  # [N, k, E]
        weight = node(
            "ReduceSum",
            [node("Mul", [onehot, node("Unsqueeze", [w, const([-1])], name)], name), const([1])],
            name,
            keepdims=0,
        )  # [N, E]
        routed = node("ReduceMax", [onehot, const([1])], name, keepdims=0)  # [N, E] 1 where routed
        weight_t = node("Unsqueeze", [node("Transpose", [weight], name, perm=[1, 0]), const([1])], name)  # [E, 1, N]
        routed_t = node(
            "Cast",
            [node("Unsqueeze", [node("Transpose", [routed], name, perm=[1, 0]), const([1])], name)],
            name,
            to=TensorProto.BOOL,
        )  # [E, 1, N]
        # Where, not a plain product: an unrouted expert's (ignored) result can never turn into NaN
        y = node("Where", [routed_t, node("Mul", [y, weight_t], name), const(0.0, np.float32)], name)
        y = node("ReduceSum", [y, const([0])], name, keepdims=0)  # [H, N]
        new_nodes.append(helper.make_node("Transpose", [y], list(n.output), name=name, perm=[1, 0]))
    for o in g.output:
        if o.name in renamed:
            raise BackendError(f"npu: graph output {o.name} is a weight")
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(added.values())
    used = {i for nd in g.node for i in nd.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    del model.functions[:]
    if any(nd.domain == DOMAIN and nd.op_type == "MoE" for nd in g.node):
        model.functions.append(moe_function("MoE"))
    if any(nd.domain == DOMAIN and nd.op_type == "LatentAttention" for nd in g.node):
        model.functions.append(latent_attention_function())


def _pin_inputs(model: onnx.ModelProto, tokens: int, capacity: int, dim: int) -> None:
    """Static input shapes: batch 1, ``tokens`` new tokens, a ``capacity``-row cache; logits of the last token."""
    g = model.graph
    shapes = {"input_ids": [1, tokens], "position_ids": [1, tokens], "attention_mask": [1, capacity + tokens]}
    for i in list(g.input):
        if i.name == "logits_to_keep":
            g.input.remove(i)
            g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "logits_to_keep"))
            continue
        dims = shapes.get(i.name, [1, capacity, dim])
        shape = i.type.tensor_type.shape
        del shape.dim[:]
        for d in dims:
            shape.dim.add().dim_value = d
    for o in g.output:
        o.type.tensor_type.ClearField("shape")


def _static_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise BackendError(f"npu: shape inference failed on the specialized graph: {exc}") from exc


def nonstatic_values(model: onnx.ModelProto) -> list[str]:
    """Names of the values whose shape is not fully static (after shape inference)."""
    model = _static_shapes(model)
    g = model.graph
    known = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    bad = []
    for n in g.node:
        for v in n.output:
            info = known.get(v)
            tt = info.type.tensor_type if info is not None else None
            if tt is None or not tt.HasField("shape") or any(not d.HasField("dim_value") for d in tt.shape.dim):
                bad.append(v)
    return bad


def _to_half(model: onnx.ModelProto, half: int, weights: _Weights, io_half: bool = True) -> onnx.ModelProto:
    """Half-precision graph: float values become ``half`` except the float32 islands (see module doc).

    Float initializers follow their consumer; float constants are clipped to the half type's finite
    range (a float32 "minus infinity" mask value stays finite, so a fully masked row cannot make NaN).
    The cache inputs/outputs become half (float32 with ``io_half=False``); logits stay float32.
    """
    model = _static_shapes(model)
    g = model.graph
    elem = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        elem[t.name] = t.data_type
    np_half = np.float16 if half == TensorProto.FLOAT16 else _bf16()
    finite = float(np.finfo(np.float16).max) if half == TensorProto.FLOAT16 else 3.38e38
    # float value -> HALF, F32 (an island's float32 result; consumers return to half) or KEEP (float32
    # lineage that stays float32: positions/rotary angles, the router's scores and weights, constants)
    precision: dict[str, str] = {}
    converted: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    count = [0]

    def is_float(v: str) -> bool:
        return elem.get(v) == TensorProto.FLOAT

    def half_init(name: str) -> str:
        if name not in converted:
            src = inits[name]
            if weights.lazy(src):
                make = lambda s=src: np.clip(weights.array(s), -finite, finite).astype(np_half)  # noqa: E731
                t = weights.placeholder(name + ":half", half, src.dims, make)
            else:
                arr = np.clip(_array(src).astype(np.float32), -finite, finite)
                t = _half_tensor(arr, name + ":half", half, np_half)
            new_inits.append(t)
            converted[name] = t.name
        return converted[name]

    def cast(v: str, to_half: bool) -> str:
        count[0] += 1
        out = f"{v}:{'half' if to_half else 'float'}{count[0]}"
        nodes.append(
            helper.make_node("Cast", [v], [out], name=f"npu_cast_{count[0]}", to=half if to_half else TensorProto.FLOAT)
        )
        return out

    for i in g.input:
        if i.type.tensor_type.elem_type == TensorProto.FLOAT:
            if io_half:
                i.type.tensor_type.elem_type = half
            precision[i.name] = HALF if io_half else F32
    router = {
        n.name
        for n in g.node
        if n.op_type in ("Gemm", "MatMul") and any(v.endswith("mlp.gate.weight") for v in n.input)
    }
    for n in g.node:
        float_ins = [v for v in n.input if v and is_float(v)]
        live = [precision.get(v, KEEP) for v in float_ins if v not in inits]
        tiny_weights = all(int(np.prod(inits[v].dims)) <= 1 for v in float_ins if v in inits)
        if n.name in router:
            result = KEEP
        elif n.op_type in _FP32_OPS:
            result = KEEP if live and all(p == KEEP for p in live) else F32
        elif n.op_type == "Cast" and not float_ins:
            result = KEEP  # e.g. positions or a one-hot mask turned into floats
        elif live and all(p == KEEP for p in live):
            result = KEEP
        elif live and all(p != HALF for p in live) and tiny_weights:
            result = F32  # e.g. the variance + eps of RMSNorm: statistics stay float32
        elif not live and not float_ins:
            result = KEEP  # a float constant made from a shape
        else:
            result = HALF
        want_half = result == HALF
        for j, v in enumerate(n.input):
            if not v or not is_float(v):
                continue
            if v in inits:
                if want_half:
                    n.input[j] = half_init(v)
            elif (precision.get(v, KEEP) == HALF) != want_half:
                n.input[j] = cast(v, want_half)
        if want_half:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = half
                if n.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(_half_tensor(_array(a.t), a.t.name, half, np_half))
        for o in n.output:
            if is_float(o):
                precision[o] = result
        nodes.append(n)

    def cast_output(name: str, to: int) -> None:
        """Give graph output ``name`` dtype ``to``: its producer and consumers use a renamed value."""
        inner = f"{name}:inner"
        for n in nodes:
            for field in (n.input, n.output):
                for j, v in enumerate(field):
                    if v == name:
                        field[j] = inner
        nodes.append(helper.make_node("Cast", [inner], [name], name=f"npu_{name}_out", to=to))

    outputs = []
    for o in g.output:
        to = TensorProto.FLOAT if o.name == "logits" or not io_half else half
        if (precision.get(o.name) == HALF) != (to == half):
            cast_output(o.name, to)
        outputs.append(helper.make_tensor_value_info(o.name, to, None))
    del g.output[:]
    g.output.extend(outputs)
    set_nodes(g, nodes, new_inits)
    del g.value_info[:]
    return _static_shapes(model)


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def _half_tensor(arr: np.ndarray, name: str, half: int, np_half: Any) -> TensorProto:
    data = np.asarray(arr, np.float32).astype(np_half)
    t = helper.make_tensor(name, half, data.shape, data.view(np.uint16).tobytes(), raw=True)
    return t


def specialize(
    artifact: Artifact, tokens: int, capacity: int, dtype: str, weights: _Weights | None = None
) -> onnx.ModelProto:
    """The neutral graph specialized to ``tokens`` new tokens over a ``capacity``-row cache, in ``dtype``.

    Large weights stay placeholders of ``weights`` (see :class:`_Weights`); their data is made when
    the graphs are written."""
    import onnx.inliner
    import onnxscript.optimizer

    weights = weights or _Weights(artifact)
    model = artifact.load_graph()
    weights.adopt(model)
    _lower_moeport_ops(model, tokens, weights)
    _pin_inputs(model, tokens, capacity, int(artifact.cache["dim"]))
    model = onnx.inliner.inline_local_functions(model)
    del model.functions[:]
    model = onnxscript.optimizer.optimize(model)  # folds every shape computation into constants
    # ONNX Runtime's Python API has no bfloat16 arrays: bfloat16 graphs keep their cache I/O in float32
    model = _to_half(model, _HALF[dtype], weights, io_half=dtype == "float16")
    bad = nonstatic_values(model)
    if bad:
        raise BackendError(f"npu: {len(bad)} values keep a dynamic shape after specialization, e.g. {bad[:3]}")
    dynamic = sorted({n.op_type for n in model.graph.node if n.op_type in _DYNAMIC_OPS})
    if dynamic:
        raise BackendError(f"npu: the specialized graph still has data-dependent operators: {', '.join(dynamic)}")
    return model


# --------------------------------------------------------------------------------------------------
# operator coverage


_DTYPE_NAMES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.BOOL: "bool",
    TensorProto.UINT8: "uint8",
    TensorProto.INT8: "int8",
}


def load_coverage(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path) if path else COVERAGE_FILE
    try:
        data = json.loads(path.read_text())
        ops = data["operators"]
    except (OSError, ValueError, KeyError) as exc:
        raise BackendError(f"npu: cannot read the operator coverage list {path}: {exc}") from exc
    return ops


def _layer_of(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> str:
    """The decoder layer a node belongs to, from its name or the weights upstream of it."""
    seen: set[str] = set()
    frontier = [node]
    for _ in range(64):
        nxt = []
        for n in frontier:
            m = re.search(r"layer(\d+)/", n.name)
            if m:
                return f"layer {m.group(1)}"
            for v in n.input:
                m = re.search(r"model\.layers\.(\d+)\.", v)
                if m:
                    return f"layer {m.group(1)}"
                if v in producers and v not in seen:
                    seen.add(v)
                    nxt.append(producers[v])
        if not nxt:
            break
        frontier = nxt
    return "the embedding/head (no decoder layer)"


def check_coverage(model: onnx.ModelProto, coverage: dict[str, Any], graph_name: str) -> None:
    """Every node's operator, opset and tensor dtypes must be in the coverage list."""
    model = _static_shapes(model)
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    elem = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    for t in g.initializer:
        elem[t.name] = t.data_type
    producers = {o: n for n in g.node for o in n.output}
    for n in g.node:

        def where(n: onnx.NodeProto = n) -> str:
            return f"node {n.name!r} in {_layer_of(n, producers)} of the {graph_name} graph"

        spec = coverage.get(n.op_type) if n.domain in ("", "ai.onnx") else None
        if spec is None:
            domain = f"{n.domain}." if n.domain else ""
            raise BackendError(f"npu: operator {domain}{n.op_type} is not in the CANN coverage list ({where()})")
        lo, hi = spec.get("opset", [1, 10**9])
        if not lo <= opset <= hi:
            raise BackendError(f"npu: {n.op_type} at opset {opset} is outside its covered opsets {lo}-{hi} ({where()})")
        allowed = set(spec.get("dtypes", []))
        for v in list(n.input) + list(n.output):
            if not v:
                continue
            name = _DTYPE_NAMES.get(elem.get(v, 0), f"type {elem.get(v)}")
            if name not in allowed:
                raise BackendError(
                    f"npu: {n.op_type} on {name} tensors is not in the CANN coverage list "
                    f"(covered: {', '.join(sorted(allowed))}; {where()})"
                )


# --------------------------------------------------------------------------------------------------
# the compiled graph set (cached in the artifact)


def _cache_key(artifact: Artifact, settings: NpuSettings) -> str:
    h = hashlib.sha256()
    h.update(artifact.content_id())
    h.update(json.dumps(settings.key_fields(), sort_keys=True).encode())
    h.update(f"{_SPEC_VERSION}|{onnx.__version__}".encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def _graph_names(settings: NpuSettings) -> dict[str, int]:
    names = {"decode": 1}
    names.update({f"prefill-{s}": s for s in settings.buckets if s > 1})
    return names


def _write_graphs(directory: Path, graphs: dict[str, onnx.ModelProto], weights: _Weights) -> None:
    """Each graph as ``<name>.onnx``; every large tensor made once, into the shared ``weights.bin``."""
    offsets: dict[str, tuple[int, int]] = {}
    with open(directory / "weights.bin", "wb") as f:
        for name, model in graphs.items():
            for t in model.graph.initializer:
                if not weights.lazy(t):
                    continue
                if t.name not in offsets:
                    raw = weights.raw(t)
                    f.write(b"\0" * ((-f.tell()) % 4096))
                    offsets[t.name] = (f.tell(), len(raw))
                    f.write(raw)
                    del raw
                offset, length = offsets[t.name]
                del t.external_data[:]
                for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
            onnx.save(model, str(directory / f"{name}.onnx"))


def _cached_set(artifact: Artifact, cache_dir: Path, key: str, trust_compiled: bool) -> VerifiedFiles | None:
    """The graph set cached in ``cache_dir`` with its files opened and verified against its meta.json, if that
    meta.json is one this machine wrote (or the manifest lists it, or the user trusts compiled files)."""
    rel = cache_dir.relative_to(artifact.directory).as_posix() + "/meta.json"
    try:
        opened = trust.open_compiled(artifact, rel)
    except (OSError, BackendError):
        return None
    try:
        listed = artifact.manifest.get("compiled", {}).get(rel)
        known = trust.built_here(opened.sha256) or (isinstance(listed, dict) and listed.get("sha256") == opened.sha256)
        if not (known or trust_compiled):
            log.warning("npu: %s was not built on this machine; rebuilding", cache_dir)
            return None
        meta = json.loads(opened.read())
    except (ValueError, RecursionError):
        return None
    finally:
        os.close(opened.fd)
    files = meta.get("files") if isinstance(meta, dict) else None
    if meta.get("key") != key or not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return None
    graph_set = VerifiedFiles(cache_dir, {name: {"sha256": sha} for name, sha in files.items()}, "meta.json")
    try:
        graph_set.verify(use_cache=False)
    except ArtifactError:
        graph_set.close()
        return None
    return graph_set


def build_graphs(
    artifact: Artifact,
    settings: NpuSettings,
    coverage: dict[str, Any],
    progress: bool = True,
    trust_compiled: bool = False,
) -> tuple[VerifiedFiles, bool]:
    """Specialize, check and cache the graph set: (its files, opened and verified; whether an earlier build
    was reused)."""
    key = _cache_key(artifact, settings)
    cache_dir = Path(artifact.directory) / "compiled" / f"npu-{key}"
    names = _graph_names(settings)
    if (cache_dir / "meta.json").is_file():
        reused = _cached_set(artifact, cache_dir, key, trust_compiled)
        if reused is not None:
            return reused, True
        log.warning("npu: cached graphs in %s are damaged, stale or not built here; rebuilding", cache_dir)
    start = time.perf_counter()
    graphs = {}
    weights = _Weights(artifact)
    for name, tokens in names.items():
        if progress:
            print(
                f"npu: specializing the {name} graph ({tokens} tokens, cache {settings.capacity})...", file=sys.stderr
            )
        model = specialize(artifact, tokens, settings.capacity, settings.dtype, weights)
        check_coverage(model, coverage, name)
        graphs[name] = model
    parent = cache_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".npu-{key}-", dir=parent))
    except OSError as exc:
        raise BackendError(f"npu: cannot write compiled graphs into {parent}: {exc}") from exc
    try:
        _write_graphs(tmp, graphs, weights)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        meta = {
            "key": key,
            "graphs": names,
            **settings.key_fields(),
            "files": files,
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        trust.record_built(sha256_file(tmp / "meta.json"))  # built here: later loads may reuse it
        if cache_dir.exists():
            shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    graph_set = VerifiedFiles(cache_dir, {name: {"sha256": sha} for name, sha in files.items()}, "meta.json")
    graph_set.verify(use_cache=False)
    return graph_set, False


# --------------------------------------------------------------------------------------------------
# execution


_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")


def emulate_half(model: onnx.ModelProto, op_types: set[str], half: int) -> None:
    """Run the nodes of ``op_types`` in float32 between casts (for a CPU without half kernels), in place."""
    g = model.graph
    inferred = _static_shapes(model).graph
    elem = {v.name: v.type.tensor_type.elem_type for v in list(inferred.value_info) + list(g.input)}
    for t in g.initializer:
        elem[t.name] = t.data_type
    nodes: list[onnx.NodeProto] = []
    count = [0]
    for n in g.node:
        if n.op_type not in op_types:
            nodes.append(n)
            continue
        for j, v in enumerate(n.input):
            if v and elem.get(v) == half:
                count[0] += 1
                out = f"{v}:emu{count[0]}"
                nodes.append(helper.make_node("Cast", [v], [out], name=f"emu_in_{count[0]}", to=TensorProto.FLOAT))
                n.input[j] = out
        tail = []
        for j, v in enumerate(n.output):
            if v and elem.get(v) == half:
                count[0] += 1
                tmp = f"{v}:emu{count[0]}"
                n.output[j] = tmp
                tail.append(helper.make_node("Cast", [tmp], [v], name=f"emu_out_{count[0]}", to=half))
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == half:
                    a.i = TensorProto.FLOAT
        if n.op_type == "ConstantOfShape":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == half:
                    a.t.CopyFrom(numpy_helper.from_array(_array(a.t).astype(np.float32), a.t.name))
        nodes.append(n)
        nodes.extend(tail)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]


class NpuProgram:
    """The graph set of one artifact behind the runtime's one-step interface.

    ``cache_capacity`` / ``cache_dtype`` tell the runtime to give every session a fixed-capacity cache
    of that dtype; each step receives the whole buffers and the mask saying which rows are valid.
    Thread-safe: graph sessions are created once and runs are serialized (one device, and a run writes
    its chunks' rows into the caller's buffers between graph calls).
    """

    def __init__(self, graph_set: VerifiedFiles, settings: NpuSettings, make_session, output_names: list[str]):
        self.graph_set = graph_set
        self.directory = graph_set.directory
        self.settings = settings
        self.cache_capacity = settings.capacity
        self.cache_dtype = np.dtype(np.float16) if settings.dtype == "float16" else np.dtype(np.float32)
        self._make_session = make_session
        self._sessions: dict[str, Any] = {}
        self.graphs = _graph_names(settings)
        self.output_names = output_names
        self.input_names = ["input_ids", "position_ids", "attention_mask", "logits_to_keep"] + [
            n.replace("new_latent", "past_latent") for n in output_names if n.startswith("new_latent.")
        ]
        self.calls: dict[str, int] = {name: 0 for name in self.graphs}
        self._lock = threading.RLock()  # guards _sessions and calls; held for a whole run

    def session(self, name: str):
        with self._lock:
            if name not in self._sessions:
                self._sessions[name] = self._make_session(f"{name}.onnx")
            return self._sessions[name]

    def _graph_for(self, n: int) -> tuple[str, int]:
        if n == 1:
            return "decode", 1
        for s in self.settings.buckets:
            if s >= n and s > 1:
                return f"prefill-{s}", s
        raise AssertionError(n)

    def _run_chunk(self, ids, pos, valid: int, caches: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """``ids``/``pos`` of n tokens after ``valid`` cached rows -> (last token's logits [1, V], rows [1, n, D])."""
        n = len(ids)
        name, size = self._graph_for(n)
        cap = self.cache_capacity
        feeds_ids = np.zeros((1, size), np.int64)
        feeds_pos = np.zeros((1, size), np.int64)
        feeds_ids[0, size - n :] = ids
        feeds_pos[0, size - n :] = pos
        mask = np.zeros((1, cap + size), np.int64)
        mask[0, :valid] = 1
        mask[0, cap + size - n :] = 1
        feeds = {"input_ids": feeds_ids, "position_ids": feeds_pos, "attention_mask": mask}
        for i, c in enumerate(caches):
            feeds[f"past_latent.{i}"] = c
        sess = self.session(name)
        self.calls[name] += 1
        out = dict(zip(self.output_names, sess.run(self.output_names, feeds), strict=True))
        rows = [out[f"new_latent.{i}"][:, size - n :] for i in range(len(caches))]
        return out["logits"][0, -1:], rows

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = feeds["input_ids"]
        if ids.shape[0] != 1:
            raise BackendError("npu: the static graphs run one sequence at a time (batch 1)")
        n = ids.shape[1]
        keep = int(feeds["logits_to_keep"][0])
        layers = sum(1 for k in feeds if k.startswith("past_latent."))
        caches = [feeds[f"past_latent.{i}"] for i in range(layers)]
        cap = self.cache_capacity
        if caches[0].shape[1] != cap or caches[0].dtype != self.cache_dtype:
            raise BackendError(
                f"npu: expected {cap}-row {self.cache_dtype} cache buffers, got {caches[0].shape} {caches[0].dtype}"
            )
        valid = int(feeds["attention_mask"][0, :cap].sum())
        tokens, positions = ids[0], feeds["position_ids"][0]
        # chunks: the last `keep` tokens one by one (their logits are wanted), the rest in bucket-sized pieces
        keep = min(max(keep, 1), n)
        sizes: list[int] = []
        rest = n - keep + 1
        largest = self.settings.buckets[-1]
        while rest > 0:
            sizes.append(min(rest, largest))
            rest -= sizes[-1]
        sizes += [1] * (keep - 1)
        logits, rows_all = [], [[] for _ in range(layers)]
        done = 0
        for size in sizes:
            lg, chunk_rows = self._run_chunk(tokens[done : done + size], positions[done : done + size], valid, caches)
            logits.append(lg)
            if done + size < n:  # later chunks attend to this one: write its rows now (the runtime writes them too)
                for c, r in zip(caches, chunk_rows, strict=True):
                    c[:, valid : valid + size] = r
            for acc, r in zip(rows_all, chunk_rows, strict=True):
                acc.append(r)
            valid += size
            done += size
        out = {"logits": np.concatenate(logits[-keep:], axis=0)[None].astype(np.float32)}
        for i, acc in enumerate(rows_all):
            out[f"new_latent.{i}"] = np.concatenate(acc, axis=1)
        return out


class _NpuBase:
    api_version = API_VERSION
    options = {
        "buckets": "prefill bucket sizes, increasing (default 32,128,512)",
        "cache_capacity": "rows of the fixed-capacity latent cache (default: the max sequence length)",
        "dtype": "compute dtype: float16 or bfloat16",
        "device_id": "the Ascend device (npu)",
        "npu_mem_limit": "CANN memory arena limit in bytes (npu)",
        "precision_mode": "CANN precision mode (npu)",
        "enable_cann_graph": "whole graphs on CANN's graph engine (npu, default true)",
        "coverage": "a cann_ops.json operator coverage file to check the graphs against",
    }

    def _compile(self, artifact: Artifact, options: dict[str, Any], make_session_for) -> NpuProgram:
        settings = settings_from(options, artifact)
        coverage = load_coverage(options.get("coverage"))
        graph_set, reused = build_graphs(
            artifact,
            settings,
            coverage,
            progress=flag(options.get("progress", True), "progress", self.name),
            trust_compiled=flag(options.get("trust_compiled", False), "trust_compiled", self.name),
        )
        meta = graph_set.read_json("meta.json") if "meta.json" in graph_set.listing else {}
        decode = onnx.load_model_from_string(graph_set.read_bytes("decode.onnx"))
        outputs = [o.name for o in decode.graph.output]
        program = NpuProgram(graph_set, settings, make_session_for(settings, graph_set), outputs)
        program.build_seconds = meta.get("build_seconds", 0.0) if isinstance(meta, dict) else 0.0
        program.cache_hit = reused
        program.library = graph_set.directory  # shown by `moeport compile`
        return program


class NpuSimBackend(_NpuBase):
    name = "npu-sim"
    description = "the npu backend's static half-precision graphs on ONNX Runtime's CPU provider (simulation)"
    priority = 1

    def availability(self) -> Availability:
        try:
            import onnxruntime as ort
            import onnxscript  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"needs onnxruntime and onnxscript ({exc})")
        return Availability(True, f"onnxruntime {ort.__version__} CPU, simulating the npu graphs")

    def compile(self, artifact: Artifact, options: dict[str, Any]) -> NpuProgram:
        threads = options.get("threads")
        emulated: set[str] = set()
        shared: dict[str, Any] = {}
        mapped: list[np.ndarray] = []

        def shared_weights(model: onnx.ModelProto, graph_set: VerifiedFiles) -> dict[str, Any]:
            """OrtValues over the memory-mapped weights.bin for the graph's initializers stored there."""
            import onnxruntime as ort

            if not mapped:
                mapped.append(np.frombuffer(graph_set.map("weights.bin"), dtype=np.uint8))
            out = {}
            for t in model.graph.initializer:
                info = {e.key: e.value for e in t.external_data}
                kind = {TensorProto.FLOAT16: np.float16, TensorProto.FLOAT: np.float32}.get(t.data_type)
                if info.get("location") != "weights.bin" or (kind is None and t.data_type != TensorProto.BFLOAT16):
                    continue
                if t.name not in shared:
                    offset, length = int(info.get("offset", 0)), int(info["length"])
                    raw = mapped[0][offset : offset + length]
                    if kind is None:  # bfloat16: numpy has no such dtype, ONNX Runtime is told the type
                        value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                            raw.view(np.uint16).reshape(tuple(t.dims)), TensorProto.BFLOAT16
                        )
                    else:
                        value = ort.OrtValue.ortvalue_from_numpy(raw.view(kind).reshape(tuple(t.dims)))
                    shared[t.name] = value
                out[t.name] = shared[t.name]
            return out

        def make_session_for(settings: NpuSettings, graph_set: VerifiedFiles):
            half = _HALF[settings.dtype]

            def make(path: str):
                import onnxruntime as ort

                model = onnx.load_model_from_string(graph_set.read_bytes(path))
                so = session_options(threads, graph_set.directory, "ORT_ENABLE_BASIC")
                for name, value in shared_weights(model, graph_set).items():
                    so.add_initializer(name, value)  # one memory-mapped copy for every graph's session
                for _ in range(64):  # ops without a half-precision CPU kernel run in float32 between casts
                    if emulated:
                        emulate_half(model, emulated, half)
                    try:
                        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    except Exception as exc:
                        m = _MISSING_KERNEL.search(str(exc))
                        if not m or m.group(1) in emulated:
                            raise BackendError(f"npu-sim: onnxruntime could not load {path}: {exc}") from exc
                        emulated.add(m.group(1))
                        model = onnx.load_model_from_string(graph_set.read_bytes(path))
                raise BackendError(f"npu-sim: could not find CPU kernels for {path}")

            return make

        program = self._compile(artifact, options, make_session_for)
        program.emulated = emulated  # operators run in float32 between casts (filled as graphs load)
        return program


def cann_status() -> Availability:
    """Whether ONNX Runtime's CANN execution provider and the CANN libraries are present, and if not, why."""
    try:
        import onnxruntime as ort
    except ImportError:
        return Availability(False, "onnxruntime-cann is not installed (pip install 'moeport[npu]')")
    if "CANNExecutionProvider" not in ort.get_available_providers():
        return Availability(
            False,
            f"onnxruntime {ort.__version__} has no CANNExecutionProvider: install onnxruntime-cann instead of "
            "onnxruntime (pip install 'moeport[npu]', see docs/npu.md)",
        )
    home = os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")
    if not home and ctypes.util.find_library("ascendcl") is None:
        return Availability(
            False,
            "the CANN libraries (libascendcl.so) are not found: install the CANN toolkit and "
            "`source /usr/local/Ascend/ascend-toolkit/set_env.sh` (see docs/npu.md)",
        )
    return Availability(True, f"onnxruntime {ort.__version__} with CANNExecutionProvider (CANN at {home or 'system'})")


class NpuBackend(_NpuBase):
    name = "npu"
    description = "Ascend NPU: static half-precision graphs on ONNX Runtime's CANN execution provider"
    priority = 30

    def availability(self) -> Availability:
        return cann_status()

    def compile(self, artifact: Artifact, options: dict[str, Any]) -> NpuProgram:
        status = cann_status()
        if not status.available:
            raise BackendError(f"npu: {status.reason}")

        def make_session_for(settings: NpuSettings, graph_set: VerifiedFiles):
            def make(path: str):
                import onnxruntime as ort

                cann = {
                    "device_id": str(settings.device_id),
                    "precision_mode": settings.precision_mode,
                    "enable_cann_graph": "1" if settings.enable_cann_graph else "0",
                    "arena_extend_strategy": "kNextPowerOfTwo",
                }
                if settings.npu_mem_limit:
                    cann["npu_mem_limit"] = str(settings.npu_mem_limit)
                try:
                    session = ort.InferenceSession(
                        graph_set.read_bytes(path),
                        session_options(options.get("threads"), graph_set.directory, "ORT_ENABLE_BASIC"),
                        providers=[("CANNExecutionProvider", cann), "CPUExecutionProvider"],
                    )
                except Exception as exc:
                    raise BackendError(f"npu: the CANN execution provider could not load {path}: {exc}") from exc
                graph_set.check_unchanged("weights.bin")  # ONNX Runtime opened it by path
                return session

            return make

        return self._compile(artifact, options, make_session_for)
