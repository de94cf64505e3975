"""The ``tvm`` backend (feasibility spike): Apache TVM Relax compiles the neutral artifact for ``llvm``.

Compiling applies a few shape-preserving rewrites that Relax's ONNX importer needs to keep every
tensor's shape known with symbolic ``batch``/``seq``/``past`` dims, imports with
``tvm.relax.frontend.onnx.from_onnx`` (plus converters that turn ``QLinear`` / ``QMoE`` / ``MoE``, float
``Gemm(x, W^T)`` and the attention's matmuls into ``call_tir`` of hand-written TIR kernels; a moeport
function they cannot take is inlined to its reference body with ``onnx.inliner``), builds with
``tvm.relax.build(mod, target)`` and runs on ``tvm.relax.VirtualMachine``. One library serves every
prompt length (no recompilation). A target without ``-mcpu`` is built for this machine's CPU.

The built library is cached in ``<artifact>/compiled/tvm-<key>/`` (``lib.so`` + ``meta.json``, written
to a temporary directory and renamed into place) and loaded with ``tvm.runtime.load_module`` on later
loads. Options: ``target`` (default ``llvm``), ``cache`` (default True), ``rebuild`` (force),
``threads`` (TVM's thread pool; default every core).

A compiled library is native code: a cached one is loaded only if this machine built it, a key the
user trusts signed it, or the user passed ``trust_compiled`` (``--trust-compiled``) — see
``backends/trust.py``; anything else is rebuilt (or, without TVM's compiler, refused by name). It is
loaded from the same descriptor it was hashed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.inliner
from onnx import helper, numpy_helper

from moeport.exporter.manifest import MANIFEST, Artifact, sha256_file
from moeport.exporter.ops import parse_op_type
from moeport.models.paths import UnsafePathError, read_inside

from . import trust
from .base import API_VERSION, Availability, BackendError, flag
from .tvm_target import TargetError, canonical, cross_linker, host_arch, is_cross, parse_target, target_arch

_PREP_VERSION = 3  # bump when the graph rewrites below change (invalidates cached libraries)


def _const(name: str, v: Any) -> onnx.NodeProto:
    """An int64 Constant node named ``name``."""
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v, np.int64), name + "_v"))


def _fix_mask(model):
    """Pin the causal mask's shape to the attention scores' at each Where it feeds."""
    g = model.graph
    masks = {n.output[0] for n in g.node if n.op_type == "And" and n.domain == ""}
    out = []
    k = [0]

    for n in g.node:
        if n.op_type == "Where" and n.domain == "" and n.input[0] in masks:
            k[0] += 1
            p = f"tvmfix{k[0]}_"
            out += [
                _const(p + "0", [0]),
                _const(p + "1", [1]),
                _const(p + "2", [2]),
                _const(p + "4", [4]),
                helper.make_node("Shape", [n.input[1]], [p + "sx"]),
                helper.make_node("Slice", [p + "sx", p + "0", p + "1"], [p + "b"]),
                helper.make_node("Slice", [p + "sx", p + "2", p + "4"], [p + "st"]),
                helper.make_node("Concat", [p + "b", p + "1", p + "st"], [p + "shape"], axis=0),
                helper.make_node("Reshape", [n.input[0], p + "shape"], [p + "mask"]),
            ]
            n.input[0] = p + "mask"
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    return model


def _fix_keep_slice(model):
    """Slice(x, -keep, END, axes=[a]) with a runtime keep -> Gather(x, Range(dim - keep, dim), axis=a).

    Relax cannot give a data-dependent Slice a shape; Range gets a fresh symbolic length instead.
    """
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    out = []
    k = [0]

    for n in g.node:
        src = prod.get(n.input[1]) if n.op_type == "Slice" and len(n.input) >= 4 else None
        if src is not None and src.op_type == "Neg" and n.input[3] in inits:
            axis = int(numpy_helper.to_array(inits[n.input[3]]).reshape(-1)[0])
            k[0] += 1
            p = f"tvmkeep{k[0]}_"
            out += [
                _const(p + "a0", [axis]),
                _const(p + "a1", [axis + 1]),
                _const(p + "one", 1),
                _const(p + "ax0", [0]),
                helper.make_node("Shape", [n.input[0]], [p + "sh"]),
                helper.make_node("Slice", [p + "sh", p + "a0", p + "a1"], [p + "dim1"]),
                helper.make_node("Squeeze", [p + "dim1", p + "ax0"], [p + "dim"]),
                helper.make_node("Squeeze", [src.input[0], p + "ax0"], [p + "keep"]),
                helper.make_node("Sub", [p + "dim", p + "keep"], [p + "start"]),
                helper.make_node("Range", [p + "start", p + "dim", p + "one"], [p + "idx"]),
                helper.make_node("Gather", [n.input[0], p + "idx"], list(n.output), axis=axis),
            ]
            continue
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    return model


def _fix_causal(model):
    """The causal comparison of two Ranges is [seq, total]: say so (Relax gives each Range a fresh length)."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    mask = "attention_mask"
    out = []

    k = [0]
    for n in g.node:
        if n.op_type == "And" and n.domain == "":
            for j, inp in enumerate(n.input):
                src = prod.get(inp)
                if src is not None and src.op_type in ("LessOrEqual", "Less", "GreaterOrEqual", "Greater"):
                    k[0] += 1
                    p = f"tvmcausal{k[0]}_"
                    out += [
                        _const(p + "1", [1]),
                        _const(p + "2", [2]),
                        helper.make_node("Shape", ["input_ids"], [p + "si"]),
                        helper.make_node("Shape", [mask], [p + "sm"]),
                        helper.make_node("Slice", [p + "si", p + "1", p + "2"], [p + "s"]),
                        helper.make_node("Slice", [p + "sm", p + "1", p + "2"], [p + "t"]),
                        helper.make_node("Concat", [p + "s", p + "t"], [p + "shape"], axis=0),
                        helper.make_node("Reshape", [inp, p + "shape"], [p + "out"]),
                    ]
                    n.input[j] = p + "out"
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    return model


_BIG = 2**31 - 1


def _fix_slice_ends(model):
    """Slice 'to the end' bounds (INT64_MAX) -> the data's actual dims (Shape slices).

    Relax's importer emits ``strided_slice(..., assume_inbound=True)``, so an end past the dim
    gives a huge output shape (overflow or an impossible allocation).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        n = consts.get(name)
        if n is not None and n.attribute and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    out = []
    k = 0
    for n in g.node:
        if n.op_type == "Slice" and n.domain == "" and len(n.input) >= 3:
            ends = value(n.input[2])
            axes = value(n.input[3]) if len(n.input) >= 4 and n.input[3] else None
            if ends is not None and np.any(ends.astype(np.float64) > _BIG):
                ends = ends.reshape(-1)
                axes = np.arange(len(ends)) if axes is None else axes.reshape(-1)
                if axes is None or len(axes) != len(ends):
                    out.append(n)
                    continue
                k += 1
                p = f"tvmend{k}_"
                out.append(helper.make_node("Shape", [n.input[0]], [p + "sh"]))
                parts = []
                for j, (a, e) in enumerate(zip(axes.tolist(), ends.tolist(), strict=True)):
                    if e > _BIG:
                        lo, hi = int(a), (int(a) + 1 if int(a) != -1 else _BIG)
                        out += [_const(f"{p}lo{j}", [lo]), _const(f"{p}hi{j}", [hi])]
                        out.append(helper.make_node("Slice", [p + "sh", f"{p}lo{j}", f"{p}hi{j}"], [f"{p}e{j}"]))
                    else:
                        out.append(_const(f"{p}e{j}", [e]))
                    parts.append(f"{p}e{j}")
                out.append(helper.make_node("Concat", parts, [p + "ends"], axis=0))
                n.input[2] = p + "ends"
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    return model


def prepare_graph(model):
    _fix_causal(model)
    _fix_mask(model)
    _fix_keep_slice(model)
    _fix_slice_ends(model)
    return model


# ---------------------------------------------------------------------------------------------------
# Hand-written TIR kernels for moeport's operators (QLinear, MoE, QMoE) and float Gemm(x, W^T).
#
# relax.build's default llvm pipeline neither fuses nor schedules: the reference bodies would run as
# scalar loops that gather the chosen experts, dequantize them to float32 and then multiply. These
# kernels read the weights in place (codes + scales; only the chosen experts), dequantize in registers
# and accumulate in vector lanes; the loop over output rows runs on TVM's thread pool
# (TVM_NUM_THREADS). The importer converts each node into ``call_tir`` of one of them.


class _Kind:
    """A weight format: float32 (bits 0) or moeport's symmetric block quantization (bits 4 / 8)."""

    def __init__(self, bits: int, bs: int, k: int, signed: bool = False):
        self.bits, self.bs, self.k = bits, bs, k
        # int8 codes flipped once at build time (code ^ 0x80, 4-bit: ^ 0x88): a sign-extended byte (its
        # high nibble: shifted right) is then code - 2^(bits-1), with no offset to subtract
        self.signed = signed and bits in (4, 8)
        if bits == 0:
            self.lanes = next(v for v in (16, 8, 4, 2, 1) if k % v == 0)
            self.kw = k  # a weight row's length: elements (float) or code bytes
        else:
            self.lanes = bs * bits // 8  # code bytes per block: one vector
            self.kw = k * bits // 8
        self.blocks = self.kw // self.lanes
        self.unroll = next(u for u in (4, 2, 1) if self.blocks % u == 0)  # independent accumulators
        self.off = 2 ** (bits - 1) if bits else 0

    @property
    def tag(self) -> str:
        return "f32" if self.bits == 0 else f"{'s' if self.signed else 'q'}{self.bits}bs{self.bs}"

    def xshape(self, rows: str) -> str:
        # 4-bit: activations de-interleaved [rows, 2, k/2] (even k, odd k) to match a byte's two nibbles
        return f"({rows}, 2, {self.kw})" if self.bits == 4 else f"({rows}, {self.k})"

    def wparams(self, rows: int, experts: int | None) -> str:
        lead = f"{experts}, " if experts is not None else ""
        if self.bits == 0:
            return f'w: T.Buffer(({lead}{rows}, {self.kw}), "float32")'
        codes = "int8" if self.signed else "uint8"
        return (
            f'w: T.Buffer(({lead}{rows}, {self.kw}), "{codes}"), s: T.Buffer(({lead}{rows}, {self.blocks}), "float32")'
        )

    def local(self, acc: str, ind: str) -> list[str]:
        return [
            f'{ind}{acc} = T.decl_buffer(({self.unroll * self.lanes},), "float32", scope="local")',
            f'{ind}t{acc} = T.decl_buffer((1,), "float32", scope="local")',
        ]

    def dot(self, acc: str, x: str, w: str, ind: str) -> list[str]:
        """Lines setting ``t<acc>[0]`` to (x row) . (w row); ``x``/``w`` are index prefixes (``x[r, ``)."""
        v, u = self.lanes, self.unroll
        k, blk, s = f"(bo * {u} + u) * {v} + l", f"bo * {u} + u", w.replace("w[", "s[", 1)
        if self.bits == 0:
            term = f"{x}{k}] * {w}{k}]"
        elif self.signed and self.bits == 8:
            term = f'{x}{k}] * T.Cast("float32", {w}{k}]) * {s}{blk}]'
        elif self.signed:
            c = f'T.Cast("int32", {w}{k}])'
            term = (
                f'({x}0, {k}] * T.Cast("float32", ({c} << 28) >> 28) + '
                f'{x}1, {k}] * T.Cast("float32", {c} >> 4)) * {s}{blk}]'
            )
        elif self.bits == 8:
            term = f'{x}{k}] * T.Cast("float32", T.Cast("int32", {w}{k}]) - {self.off}) * {s}{blk}]'
        else:  # uint8 vector arithmetic miscompiles in TVM 0.27's llvm codegen: widen to int32 first
            c = f'T.Cast("int32", {w}{k}])'
            term = (
                f'({x}0, {k}] * T.Cast("float32", ({c} & 15) - {self.off}) + '
                f'{x}1, {k}] * T.Cast("float32", ({c} >> 4) - {self.off})) * {s}{blk}]'
            )
        return [
            f"{ind}for l in T.vectorized({u * v}):",
            f"{ind}    {acc}[l] = T.float32(0)",
            f"{ind}for bo in range({self.blocks // u}):",
            f"{ind}    for u in T.unroll({u}):",
            f"{ind}        for l in T.vectorized({v}):",
            f"{ind}            {acc}[u * {v} + l] = {acc}[u * {v} + l] + {term}",
            *self._sum(acc, ind),
        ]

    def _sum(self, acc: str, ind: str) -> list[str]:
        """t<acc>[0] = the sum of the lanes: halving vector adds (a power of two), then scalar adds."""
        width, lines = self.unroll * self.lanes, []
        while width > 1 and width % 2 == 0:
            width //= 2
            lines += [f"{ind}for l in T.vectorized({width}):", f"{ind}    {acc}[l] = {acc}[l] + {acc}[l + {width}]"]
        lines.append(f"{ind}t{acc}[0] = {acc}[0]")
        if width > 1:
            lines += [f"{ind}for l in range(1, {width}):", f"{ind}    t{acc}[0] = t{acc}[0] + {acc}[l]"]
        return lines


_HEAD = ["# from tvm.script import tirx as T", "@T.prim_func(private=True)"]
_NOALIAS = '    T.func_attr({"tir.noalias": True})'


def _linear_src(kind: _Kind, n: int) -> str:
    """y[r, n] = x[r] . W[n] (W [n, k], float or quantized)."""
    return "\n".join(
        [
            *_HEAD,
            f"def main(var_x: T.handle, {kind.wparams(n, None)}, var_y: T.handle):",
            _NOALIAS,
            "    R = T.int64()",
            f'    x = T.match_buffer(var_x, {kind.xshape("R")}, "float32")',
            f'    y = T.match_buffer(var_y, (R, {n}), "float32")',
            f"    for n in T.parallel({n}):",  # rows of one weight row in turn: it stays in L1
            "        for r in range(R):",
            *kind.local("acc", "            "),
            *kind.dot("acc", "x[r, ", "w[n, ", "            "),
            "            y[r, n] = tacc[0]",
        ]
    )


def _moe_act_src(kind: _Kind, experts: int, inter: int, topk: int) -> str:
    """a[m*topk + j, i] = silu(gate_i . x[m]) * (up_i . x[m]) of expert idx[m, j] (gate/up rows interleaved)."""
    return "\n".join(
        [
            *_HEAD,
            f"def main(var_x: T.handle, var_idx: T.handle, {kind.wparams(2 * inter, experts)}, var_a: T.handle):",
            _NOALIAS,
            "    M = T.int64()",
            f'    x = T.match_buffer(var_x, {kind.xshape("M")}, "float32")',
            f'    idx = T.match_buffer(var_idx, (M, {topk}), "int64")',
            f'    a = T.match_buffer(var_a, (M * {topk}, {inter}), "float32")',
            f"    for i in T.parallel({inter}):",  # loop variables, not let-bound indices: kept in registers
            "        for m in range(M):",
            f"            for j in range({topk}):",
            *kind.local("ag", "                "),
            *kind.local("au", "                "),
            *kind.dot("ag", "x[m, ", "w[idx[m, j], i * 2, ", "                "),
            *kind.dot("au", "x[m, ", "w[idx[m, j], i * 2 + 1, ", "                "),
            f"                a[m * {topk} + j, i] = tag[0] * T.sigmoid(tag[0]) * tau[0]",
        ]
    )


def _moe_down_src(kind: _Kind, experts: int, hidden: int, topk: int) -> str:
    """y[m, n] = sum_j wt[m, j] * (down[idx[m, j], n] . a[m*topk + j])."""
    return "\n".join(
        [
            *_HEAD,
            f"def main(var_a: T.handle, var_idx: T.handle, var_wt: T.handle, {kind.wparams(hidden, experts)}, "
            "var_y: T.handle):",
            _NOALIAS,
            "    M = T.int64()",
            f'    x = T.match_buffer(var_a, {kind.xshape(f"M * {topk}")}, "float32")',
            f'    idx = T.match_buffer(var_idx, (M, {topk}), "int64")',
            f'    wt = T.match_buffer(var_wt, (M, {topk}), "float32")',
            f'    y = T.match_buffer(var_y, (M, {hidden}), "float32")',
            f"    for n in T.parallel({hidden}):",
            "        for m in range(M):",
            *kind.local("acc", "            "),
            '            out = T.decl_buffer((1,), "float32", scope="local")',
            "            out[0] = T.float32(0)",
            f"            for j in range({topk}):",
            *kind.dot("acc", f"x[m * {topk} + j, ", "w[idx[m, j], n, ", "                "),
            "                out[0] = out[0] + wt[m, j] * tacc[0]",
            "            y[m, n] = out[0]",
        ]
    )


def _bmm_src(heads: int, k: str, n: int, v_mode: str) -> str:
    """y[b, h, s, :] = sum_p a[b, h, s, p] * v[.., p, :] (the attention's probs @ values and the per-head
    absorbed weights): v is ``const`` [heads, k, n], ``shared`` [b, 1, k, n] or ``perhead`` [b, heads, k, n];
    the n outputs of a row accumulate as one vector."""
    vshape = {"const": f"({heads}, {k}, {n})", "shared": f"(B, 1, {k}, {n})", "perhead": f"(B, {heads}, {k}, {n})"}
    vrow = {"const": "v[h, p, l]", "shared": "v[b, 0, p, l]", "perhead": "v[b, h, p, l]"}[v_mode]
    return "\n".join(
        [
            *_HEAD,
            "def main(var_a: T.handle, var_v: T.handle, var_y: T.handle):",
            _NOALIAS,
            "    B = T.int64()",
            "    S = T.int64()",
            *(["    P = T.int64()"] if k == "P" else []),
            f'    a = T.match_buffer(var_a, (B, {heads}, S, {k}), "float32")',
            f'    v = T.match_buffer(var_v, {vshape[v_mode]}, "float32")',
            f'    y = T.match_buffer(var_y, (B, {heads}, S, {n}), "float32")',
            f"    for bhs in T.parallel(B * {heads} * S):",
            f'        acc = T.decl_buffer(({n},), "float32", scope="local")',
            f"        b = bhs // ({heads} * S)",
            f"        h = bhs // S % {heads}",
            "        s = bhs % S",
            f"        for l in T.vectorized({n}):",
            "            acc[l] = T.float32(0)",
            f"        for p in range({k}):",
            f"            for l in T.vectorized({n}):",
            f"                acc[l] = acc[l] + a[b, h, s, p] * {vrow}",
            f"        for l in T.vectorized({n}):",
            "            y[b, h, s, l] = acc[l]",
        ]
    )


def _bmm_nt_src(heads: int, k: int, vheads: int) -> str:
    """y[b, h, s, p] = a[b, h, s, :] . v[b, h or 0, p, :] (the attention's scores q . k over the cache)."""
    kind = _Kind(0, 0, k)
    vh = "h" if vheads == heads else "0"
    return "\n".join(
        [
            *_HEAD,
            "def main(var_a: T.handle, var_v: T.handle, var_y: T.handle):",
            _NOALIAS,
            "    B = T.int64()",
            "    S = T.int64()",
            "    P = T.int64()",
            f'    a = T.match_buffer(var_a, (B, {heads}, S, {k}), "float32")',
            f'    v = T.match_buffer(var_v, (B, {vheads}, P, {k}), "float32")',
            f'    y = T.match_buffer(var_y, (B, {heads}, S, P), "float32")',
            f"    for h in T.parallel({heads}):",
            "        for b in range(B):",
            "            for s in range(S):",
            "                for p in range(P):",
            *kind.local("acc", "                    "),
            *kind.dot("acc", "a[b, h, s, ", f"v[b, {vh}, p, ", "                    "),
            "                    y[b, h, s, p] = tacc[0]",
        ]
    )


def _kernel_format(op: str) -> tuple[int, int] | None:
    """(bits, block size) of a moeport op the kernels take: float MoE (0, 0), QLinear/QMoE at 4 or 8 bits."""
    kind, bits, bs = parse_op_type(op)
    if kind == "MoE" or (kind in ("QLinear", "QMoE") and bits in (4, 8)):
        return bits, bs
    return None


def _kernel_ops(model) -> set[str]:
    """moeport's ops (op_type) whose every node the kernels take: known format, weights are initializers.

    The others keep their reference bodies (inlined)."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    ok: dict[str, bool] = {}
    for n in model.graph.node:
        if n.domain != "ai.moeport":
            continue
        fmt = _kernel_format(n.op_type)
        weights = n.input[1:] if n.op_type.startswith("QLinear") else n.input[3:]
        good = all(w in inits for w in weights) and fmt is not None
        if good and fmt[0]:
            bits, bs = fmt
            scale_dims = [inits[w] for w in weights[1::2]]
            good = bs > 0 and bs * bits % 16 == 0 and all(len(d) >= 2 for d in scale_dims)
        ok[n.op_type] = ok.get(n.op_type, True) and good
    return {op for op, good in ok.items() if good}


def inline_all_but_kernel_ops(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """The model with moeport's ops that the kernels do not take inlined to their reference bodies, and
    the ops that the kernels take (see :func:`_kernel_ops`)."""
    ops = _kernel_ops(model)
    keep = [(f.domain, f.name) for f in model.functions if f.name in ops]
    if len(keep) < len(model.functions):
        model = onnx.inliner.inline_selected_functions(model, keep, exclude=True)
    return model, ops


class _Converters:
    """Relax ONNX importer converters that emit ``call_tir`` of the kernels above (one PrimFunc per shape)."""

    def __init__(self, original: dict[str, Any]):
        self.original = original
        self.funcs: dict[str, Any] = {}

    def table(self, ops: set[str]) -> dict[str, Any]:
        conv = {"Gemm": _Converter(self._gemm), "MatMul": _Converter(self._matmul)}
        for op in ops:
            fn = self._qlinear if op.startswith("QLinear") else self._moe
            conv[op] = _Converter(lambda bb, inputs, attr, params, fn=fn, op=op: fn(op, bb, inputs, attr))
        return conv

    def _func(self, bb, src: str, name: str):
        gv = self.funcs.get(src)
        if gv is None:
            import tvm.script

            gv = self.funcs[src] = bb.add_func(tvm.script.from_source(src), name)
        return gv

    @staticmethod
    def _rows(bb, x, k: int):
        from tvm import relax

        if x.ty.ndim != 2:
            x = bb.emit(relax.op.reshape(x, (-1, k)))
        return x

    @staticmethod
    def _feed(bb, x, kind: _Kind):
        """The activations as the kernel reads them (4-bit: [rows, 2, k/2], even and odd k apart)."""
        from tvm import relax

        if kind.bits != 4:
            return x
        return bb.emit(relax.op.permute_dims(relax.op.reshape(x, (-1, kind.k // 2, 2)), [0, 2, 1]))

    def _linear(self, bb, x, weights: list, kind: _Kind, n: int):
        from tvm import relax

        lead = list(x.ty.shape.values[:-1])
        x2 = self._rows(bb, x, kind.k)
        gv = self._func(bb, _linear_src(kind, n), f"moeport_linear_{kind.tag}_{n}x{kind.k}")
        rows = x2.ty.shape.values[0]
        y = bb.emit(relax.call_tir(gv, [self._feed(bb, x2, kind), *weights], relax.TensorType([rows, n], "float32")))
        return y if len(lead) == 1 else relax.op.reshape(y, [*lead, n])

    def _gemm(self, bb, inputs, attr, params):
        import tvm

        x, w = inputs[0], inputs[1]
        plain = (
            isinstance(w, tvm.ir.GenericConst)
            and attr.get("transB", 0) == 1
            and not attr.get("transA", 0)
            and attr.get("alpha", 1.0) == 1.0
            and (len(inputs) < 3 or inputs[2] is None)
            and w.ty.ndim == 2
            and w.ty.dtype == "float32"
            and x.ty.dtype == "float32"
            and x.ty.ndim == 2
        )
        if not plain:
            return self.original["Gemm"].get_converter(18)(bb, inputs, attr, params)
        n, k = (int(d) for d in w.ty.shape.values)
        return self._linear(bb, x, [w], _Kind(0, 0, k), n)

    def _matmul(self, bb, inputs, attr, params):
        import tvm
        from tvm import relax

        a, v = inputs[0], inputs[1]
        at, vt = a.ty, v.ty
        dims = [d.value if isinstance(d, tvm.tirx.IntImm) else None for d in at.shape.values] if at.ndim == 4 else []
        mode = None
        if dims and at.dtype == "float32" and vt.dtype == "float32" and dims[1] and isinstance(v, tvm.ir.GenericConst):
            if vt.ndim == 3 and int(vt.shape.values[0]) == dims[1] and int(vt.shape.values[1]) == dims[3]:
                mode = "const"
        elif dims and at.dtype == "float32" and vt.dtype == "float32" and dims[1] and vt.ndim == 4:
            vd = [d.value if isinstance(d, tvm.tirx.IntImm) else None for d in vt.shape.values]
            if vd[1] in (1, dims[1]) and vd[3] is not None and (dims[3] is None or dims[3] == vd[2]):
                mode = "shared" if vd[1] == 1 and dims[1] != 1 else "perhead"
        if dims and mode is None and at.dtype == "float32" and dims[1] and dims[3]:
            nt = self._transposed(bb, v)  # MatMul(q, Transpose(cache)): a dot product per score
            if nt is not None and nt.ty.dtype == "float32" and nt.ty.ndim == 4:
                vd = [d.value if isinstance(d, tvm.tirx.IntImm) else None for d in nt.ty.shape.values]
                if vd[1] in (1, dims[1]) and vd[3] == dims[3]:
                    gv = self._func(bb, _bmm_nt_src(dims[1], dims[3], vd[1]), f"moeport_bmm_nt_{dims[1]}x{dims[3]}")
                    shape = [*at.shape.values[:3], nt.ty.shape.values[2]]
                    return bb.emit(relax.call_tir(gv, [a, nt], relax.TensorType(shape, "float32")))
        n = int(vt.shape.values[-1]) if mode else 0
        if mode is None or not 0 < n <= 512:
            return self.original["MatMul"].get_converter(18)(bb, inputs, attr, params)
        k = str(dims[3]) if mode == "const" else "P"
        gv = self._func(bb, _bmm_src(dims[1], k, n, mode), f"moeport_bmm_{mode}_{dims[1]}x{k}x{n}")
        shape = [*at.shape.values[:3], n]
        return bb.emit(relax.call_tir(gv, [a, v], relax.TensorType(shape, "float32")))

    @staticmethod
    def _transposed(bb, v):
        """x when ``v`` is permute_dims(x, [0, 1, 3, 2]) bound in this function, else None."""
        import tvm
        from tvm import relax

        bound = v  # the importer passes an operator's result as its (normalized) expression or a bound var
        if isinstance(v, relax.Var):
            try:
                bound = bb.lookup_binding(v)
            except Exception:
                return None
        if not isinstance(bound, relax.Call) or bound.op != tvm.ir.Op.get("relax.permute_dims"):
            return None
        axes = bound.attrs.axes
        return bound.args[0] if axes is not None and [int(x) for x in axes] == [0, 1, 3, 2] else None

    def _qlinear(self, op: str, bb, inputs, attr):
        bits, bs = _kernel_format(op)
        codes, scales = _signed(inputs[1], bits), inputs[2]
        n, blocks = (int(d) for d in scales.ty.shape.values)
        kind = _Kind(bits, bs, blocks * bs, signed=codes is not inputs[1])
        return self._linear(bb, inputs[0], [codes, scales], kind, n)

    def _moe(self, op: str, bb, inputs, attr):
        from tvm import relax

        bits, bs = _kernel_format(op)
        q = bits > 0
        x, idx, wt = inputs[0], inputs[1], inputs[2]
        gate_up, down = (inputs[3:5], inputs[5:7]) if q else ([inputs[3]], [inputs[4]])
        signed = q and all(_signed(w[0], bits) is not w[0] for w in (gate_up, down))
        if signed:
            gate_up, down = [_signed(gate_up[0], bits), gate_up[1]], [_signed(down[0], bits), down[1]]
        e, two_i, c = (int(d) for d in gate_up[-1].ty.shape.values)
        _, hidden, c_down = (int(d) for d in down[-1].ty.shape.values)
        k_up, k_down = (c * bs, c_down * bs) if q else (c, c_down)
        topk = int(idx.ty.shape.values[-1])
        up_kind, down_kind = _Kind(bits, bs, k_up, signed), _Kind(bits, bs, k_down, signed)
        x2 = self._rows(bb, x, k_up)
        idx = bb.emit(relax.op.astype(idx, "int64")) if idx.ty.dtype != "int64" else idx
        m = x2.ty.shape.values[0]
        act_gv = self._func(bb, _moe_act_src(up_kind, e, two_i // 2, topk), f"moeport_moe_act_{up_kind.tag}")
        down_gv = self._func(bb, _moe_down_src(down_kind, e, hidden, topk), f"moeport_moe_down_{down_kind.tag}")
        act = bb.emit(
            relax.call_tir(
                act_gv,
                [self._feed(bb, x2, up_kind), idx, *gate_up],
                relax.TensorType([m * topk, two_i // 2], "float32"),
            )
        )
        y = bb.emit(
            relax.call_tir(
                down_gv,
                [self._feed(bb, act, down_kind), idx, wt, *down],
                relax.TensorType([m, hidden], "float32"),
            )
        )
        lead = list(x.ty.shape.values[:-1])
        return y if len(lead) == 1 else relax.op.reshape(y, [*lead, hidden])


def _signed(codes, bits: int):
    """Constant codes as the signed kernels read them (int8: 8-bit ``code ^ 0x80`` is ``code - 128``;
    4-bit ``code ^ 0x88`` makes each nibble ``code - 8`` in two's complement), else ``codes`` itself."""
    import tvm
    from tvm import relax

    if bits not in (4, 8) or not isinstance(codes, tvm.ir.GenericConst) or codes.ty.dtype != "uint8":
        return codes
    flip = np.uint8(0x80 if bits == 8 else 0x88)
    return relax.const((codes.value.numpy() ^ flip).view(np.int8), "int8")


class _Converter:
    """What the ONNX importer's table holds: ``get_converter(opset)`` -> fn(bb, inputs, attr, params)."""

    def __init__(self, fn):
        self.fn = fn

    def get_converter(self, opset: int):
        return self.fn


def _import(model, ops: set[str]):
    """``from_onnx`` with the kernels' converters added to the importer's table for the call."""
    from tvm.relax.frontend.onnx import from_onnx, onnx_frontend

    original = onnx_frontend._get_convert_map
    table = original()
    extra = _Converters(table).table(ops)
    onnx_frontend._get_convert_map = lambda: {**table, **extra}
    try:
        with warnings.catch_warnings():  # "Renaming name past_latent.0 to past_latent_0": inputs are positional
            warnings.simplefilter("ignore")
            return from_onnx(model, keep_params_in_input=False)
    finally:
        onnx_frontend._get_convert_map = original


class TvmProgram:
    """A Relax VM over the built library; inputs are passed positionally in graph-input order.

    The Relax VM keeps per-call state (registers, the current frame) in the VM object and is not
    thread-safe: calls from several threads (sessions generating in parallel) are serialized.
    """

    def __init__(
        self,
        lib: Any,
        input_names: list[str],
        output_names: list[str],
        cache_hit: bool,
        build_s: float,
        library: Path | None = None,
    ):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # the runtime's VM: no compiler needed

        _load_runtime_extra(tvm)
        self._tvm = tvm
        self.lib = lib
        self.vm = VirtualMachine(lib, tvm.cpu())
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.cache_hit = cache_hit
        self.build_seconds = build_s
        self.library = library
        self._lock = threading.Lock()  # one VM call at a time

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tvm = self._tvm
        dev = tvm.cpu()
        past = [n for n in self.input_names if n.startswith("past_latent")]
        if past and feeds[past[0]].shape[1] == 0:
            # An empty past makes a zero-length reduction (probs[:, :past] @ past) whose TIR kernel never
            # initialises its output; one masked-out zero row gives the same result exactly.
            feeds = dict(feeds)
            for n in past:
                x = feeds[n]
                feeds[n] = np.zeros((x.shape[0], 1, x.shape[2]), x.dtype)
            m = feeds["attention_mask"]
            feeds["attention_mask"] = np.concatenate([np.zeros((m.shape[0], 1), m.dtype), m], axis=1)
        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), dev) for n in self.input_names]
        with self._lock:
            out = self.vm["main"](*args)
            outs = [out[i] for i in range(len(out))] if len(self.output_names) > 1 else [out]
            return {n: o.numpy() for n, o in zip(self.output_names, outs, strict=True)}


def _load_runtime_extra(tvm: Any) -> None:
    """libtvm_runtime_extra holds kernels the built library calls (``tvm.contrib.sort.topk`` for MoE
    routing). ``import tvm`` loads it only with the compiler; runtime-only mode needs it too."""
    libs = getattr(tvm.base, "_LOADED_LIBS", None)
    if libs is None or "tvm_runtime_extra" in libs:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        runtime_dir = Path(libs["tvm_runtime"]._name).resolve().parent
        libs["tvm_runtime_extra"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_extra", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (KeyError, OSError, RuntimeError):
        pass  # an older/newer TVM layout: a missing kernel is reported by the VM when called


class CrossCompiledProgram:
    """A library built for another CPU architecture: written into the artifact for deployment, not run here."""

    def __init__(
        self, library: Path, input_names: list[str], output_names: list[str], arch: str, cache_hit: bool, build_s: float
    ):
        self.library = library
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.arch = arch
        self.cache_hit = cache_hit
        self.build_seconds = build_s

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise BackendError(
            f"tvm: {self.library} holds {self.arch} code and this machine is {host_arch()}: copy the artifact "
            f"(with its compiled/ directory) to the {self.arch} machine and run it there"
        )


def _base_key(artifact: Artifact, tvm_version: str) -> str:
    """What a library's code depends on besides the target: the graph and weights, TVM, this file."""
    h = hashlib.sha256()
    h.update(artifact.content_id())
    h.update(f"{tvm_version}|{_PREP_VERSION}".encode())
    h.update(Path(__file__).read_bytes())  # the graph rewrites and the calling convention in this file
    return h.hexdigest()[:16]


def _dir_key(base: str, target: dict[str, Any]) -> str:
    return hashlib.sha256(f"{base}|{canonical(target)}".encode()).hexdigest()[:16]


SHIPPED = "compiled"  # manifest section: an inventory of the libraries `moeport compile` built (not a trust)
MAX_META_BYTES = 1 << 20


def _rel(artifact: Artifact, path: Path) -> str:
    return path.relative_to(artifact.directory).as_posix()


def _read_meta(artifact: Artifact, d: Path) -> dict[str, Any] | None:
    """A build's meta.json, read through the path resolver (it comes with the artifact: untrusted data)."""
    try:
        meta = json.loads(read_inside(artifact.directory, _rel(artifact, d / "meta.json"), "meta.json", MAX_META_BYTES))
    except (OSError, UnsafePathError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def _ship(artifact: Artifact, lib: Path, meta: dict[str, Any], sha: str) -> None:
    """List ``lib`` in the manifest's inventory of compiled libraries (path, sha256, target)."""
    path = artifact.directory / MANIFEST
    manifest = json.loads(path.read_text())
    shipped = {k: v for k, v in manifest.get(SHIPPED, {}).items() if (artifact.directory / k).is_file()}
    shipped[_rel(artifact, lib)] = {
        "sha256": sha,
        "size": lib.stat().st_size,
        **{k: str(meta.get(k)) for k in ("target", "arch", "tvm")},
    }
    manifest[SHIPPED] = shipped
    tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    artifact.manifest[SHIPPED] = shipped


def _compiler_available(tvm: Any) -> bool:
    """False in TVM's runtime-only mode (TVM_USE_RUNTIME_LIB=1, or no loadable libtvm_compiler)."""
    if getattr(tvm.base, "_RUNTIME_ONLY", False):
        return False
    try:
        from tvm import relax  # noqa: F401
    except Exception:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_target(tvm: Any, target: dict[str, Any], text: str) -> Any:
    """TVM's Target for ``target``, refused early (before a long build) when TVM or LLVM would reject it."""
    try:
        tvm_target = tvm.target.Target(target)
    except Exception as exc:
        raise BackendError(f"tvm: could not compile for target {text!r}: TVM rejects it: {_first_line(exc)}") from exc
    if target.get("kind") != "llvm":
        raise BackendError(
            f"tvm: could not compile for target {text!r}: the tvm backend builds for CPUs (kind 'llvm'), "
            f"not {target['kind']!r}"
        )
    from tvm.target import codegen

    arch = str(target.get("mtriple", "")).split("-")[0]
    if arch and arch not in list(codegen.llvm_get_targets()):
        raise BackendError(f"tvm: could not compile for target {text!r}: TVM's LLVM has no {arch!r} architecture")
    cpu = target.get("mcpu")
    if cpu and cpu not in list(codegen.llvm_get_cpu_archlist(tvm_target)):
        raise BackendError(f"tvm: could not compile for target {text!r}: LLVM knows no CPU {cpu!r} for this triple")
    return tvm_target


def _use_threads(threads: int | None) -> None:
    """Size TVM's thread pool: ``threads``, else TVM_NUM_THREADS if set, else every core (TVM's own
    default on x86 is half the cores, assuming hyper-threads: one thread on a 2-core machine). TVM reads
    the variable when its pool starts, at the first parallel kernel: the first model of a process decides."""
    if threads or "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(int(threads or os.cpu_count() or 1))


def _for_this_cpu(target: dict[str, Any]) -> dict[str, Any]:
    """A target for this machine that names no CPU gets this machine's (``-mcpu=<host>``): without it LLVM
    assumes a baseline CPU (x86-64: SSE2 only) and the kernels' vector loops run at a third of the speed.
    Such a library needs a CPU with the same features; give an explicit ``-mcpu`` to build for others."""
    if target.get("kind") != "llvm" or is_cross(target) or "mcpu" in target or "mattr" in target:
        return target
    from tvm.target import codegen

    cpu = str(codegen.llvm_get_system_cpu() or "")
    return {**target, "mcpu": cpu} if cpu and cpu != "generic" else target


class TvmBackend:
    name = "tvm"
    description = "Apache TVM Relax, compiled for CPUs (llvm, cross-compiles); TIR kernels for MoE/QMoE/QLinear"
    priority = 5
    api_version = API_VERSION
    options = {
        "target": "TVM target, e.g. llvm or 'llvm -mtriple=aarch64-linux-gnu -mattr=+neon' (default llvm, this CPU)",
        "cache": "keep the built library in ARTIFACT/compiled/ (default true)",
        "rebuild": "build even if a usable library is cached",
        "ship": "list the library in the manifest's inventory (moeport compile does)",
        "sign_key": "sign the library with this Ed25519 private key file",
    }

    def availability(self) -> Availability:
        try:
            import tvm
        except Exception:
            return Availability(False, "apache-tvm not installed (pip install 'moeport[tvm]')")
        if not _compiler_available(tvm):
            return Availability(True, f"apache-tvm {tvm.__version__}, runtime only: runs libraries compiled elsewhere")
        return Availability(True, f"apache-tvm {tvm.__version__}")

    def compile(self, artifact: Artifact, options: dict[str, Any]) -> TvmProgram | CrossCompiledProgram:
        """Load the artifact's compiled library for ``options["target"]`` (default llvm for this CPU), or
        build it. Options: ``target``, ``cache`` (default True), ``rebuild``, ``ship`` (list the library
        in the manifest, as ``moeport compile`` does), ``progress`` (default True: say so on stderr
        before a build)."""
        import tvm

        _use_threads(options.get("threads"))
        text = str(options.get("target") or "llvm")
        try:
            target = parse_target(text)
        except TargetError as exc:
            raise BackendError(f"tvm: could not compile: {exc}") from exc
        compiler = _compiler_available(tvm)
        if compiler:
            target = _for_this_cpu(target)
        graph = artifact.load_graph()
        names = ([i.name for i in graph.graph.input], [o.name for o in graph.graph.output])
        trust_compiled = flag(options.get("trust_compiled", False), "trust_compiled", "tvm")
        base = _base_key(artifact, tvm.__version__)
        root = Path(artifact.directory) / "compiled"
        cache_dir = root / f"tvm-{_dir_key(base, target)}"
        use_cache, ship = options.get("cache", True), bool(options.get("ship"))

        refused: list[str] = []  # "path: why" of each library found but not loaded
        if use_cache and not options.get("rebuild"):
            for d, meta in self._candidates(
                artifact, root, cache_dir, base, target, bool(options.get("target")), compiler
            ):
                lib = d / "lib.so"
                opened = trust.open_compiled(artifact, _rel(artifact, lib))
                try:
                    decision = trust.decide(artifact, opened.name, opened.sha256, trust_compiled)
                    if not decision.allowed:
                        refused.append(f"refusing to load {lib}: {decision.reason}")
                        continue
                    if options.get("sign_key"):
                        trust.sign(lib, opened.sha256, Path(options["sign_key"]))
                    if ship:
                        _ship(artifact, lib, meta, opened.sha256)
                    if meta.get("arch") != host_arch():
                        return CrossCompiledProgram(lib, *names, str(meta.get("arch")), True, 0.0)
                    try:
                        module = trust.load_native(opened, tvm.runtime.load_module)
                        return TvmProgram(module, *names, True, 0.0, library=lib)
                    except Exception as exc:  # damaged: rebuild below (or refuse in runtime-only mode)
                        refused.append(f"cannot load {lib}: {_first_line(exc)}")
                finally:
                    os.close(opened.fd)
        if not compiler:
            raise BackendError(self._cannot_build(artifact, root, text, refused))
        for problem in refused:
            _say(options, f"tvm: {problem}; rebuilding")
        return self._build(tvm, artifact, target, text, base, cache_dir, names, use_cache, ship, options)

    @staticmethod
    def _candidates(
        artifact: Artifact,
        root: Path,
        cache_dir: Path,
        base: str,
        target: dict[str, Any],
        explicit: bool,
        compiler: bool,
    ) -> list[tuple[Path, dict[str, Any]]]:
        """Cached libraries that fit, with their meta.json: the one for exactly this target, then (no target
        given) one built for this CPU architecture that the manifest lists or, without a compiler, any such
        one. Whether one may be loaded is decided after (backends/trust.py)."""
        import tvm

        found = []
        if not root.is_dir() or root.is_symlink():
            return found
        others = sorted(root.glob("tvm-*/meta.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for meta_path in [cache_dir / "meta.json", *(p for p in others if p.parent != cache_dir)]:
            d = meta_path.parent
            meta = _read_meta(artifact, d)
            if meta is None or not (d / "lib.so").is_file():
                continue
            if meta.get("base") != base or meta.get("tvm") != tvm.__version__:
                continue  # another graph, TVM version or moeport: never loaded
            if d == cache_dir:
                if meta.get("target_json") == canonical(target):
                    found.append((d, meta))
            elif not explicit and meta.get("arch") == host_arch():
                if not compiler or _rel(artifact, d / "lib.so") in artifact.manifest.get(SHIPPED, {}):
                    found.append((d, meta))
        return found

    @staticmethod
    def _cannot_build(artifact: Artifact, root: Path, text: str, refused: list[str]) -> str:
        import tvm

        why = "TVM's compiler is not loaded here (runtime-only apache-tvm), so it cannot be rebuilt"
        if refused:
            return f"tvm: {refused[0]}; {why}"
        found = sorted(
            f"{m.get('arch')}/apache-tvm {m.get('tvm')}/{m.get('target')!r}"
            for m in (_read_meta(artifact, p.parent) or {} for p in root.glob("tvm-*/meta.json"))
        )
        have = (
            f" (it has libraries for: {', '.join(found)}; they need the same moeport and apache-tvm)" if found else ""
        )
        return (
            f"tvm: {artifact.directory} has no compiled library for this machine ({host_arch()}, apache-tvm "
            f"{tvm.__version__}, target {text!r}){have}; {why}: run `moeport compile ARTIFACT --backend tvm "
            "--target ...` on a machine with the full apache-tvm and copy the artifact with its compiled/ directory"
        )

    def _build(
        self,
        tvm: Any,
        artifact: Artifact,
        target: dict[str, Any],
        text: str,
        base: str,
        cache_dir: Path,
        names: tuple[list[str], list[str]],
        use_cache: bool,
        ship: bool,
        options: dict[str, Any],
    ) -> TvmProgram | CrossCompiledProgram:
        from tvm import relax

        tvm_target = _check_target(tvm, target, text)
        cross = is_cross(target)
        try:
            linker, fcompile = cross_linker(target) if cross else ("cc", None)
        except TargetError as exc:
            raise BackendError(f"tvm: cannot build for {text!r}: {exc}") from exc
        _say(options, f"tvm: compiling {artifact.directory} for {text} (once; cached in {cache_dir}) ...")
        start = time.perf_counter()
        try:
            # The inliner serializes the model: weights > 2 GB (protobuf's limit) load after it
            model = artifact.load_graph()
            model, ops = inline_all_but_kernel_ops(model)
            artifact.load_external_data(model)  # from the verified files, never by path
            prepare_graph(model)
            mod = _import(model, ops)
            del model  # the weights live on as the module's constants: not twice during the build
            # Gemm(transB=1) that the kernels do not take imports as permute_dims + matmul: legalized apart,
            # every step would copy the weight into a transposed buffer first; NT_matmul reads it in place.
            mod = relax.transform.FuseTransposeMatmul()(mod)
            ex = relax.build(mod, target=tvm_target)
        except Exception as exc:
            raise BackendError(f"tvm: could not compile {artifact.graph_path}: {_first_line(exc)}") from exc
        build_s = time.perf_counter() - start
        if not use_cache and not cross:
            return TvmProgram(ex, *names, False, build_s)
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
        try:
            try:
                ex.export_library(str(tmp / "lib.so"), fcompile=fcompile)
            except Exception as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise BackendError(f"tvm: could not link the library for {text!r} with {linker}: {exc}") from exc
            meta = {
                "key": cache_dir.name.removeprefix("tvm-"),
                "base": base,
                "tvm": tvm.__version__,
                "target": text,
                "target_json": canonical(target),
                "arch": target_arch(target),
                "linker": linker,
                "build_seconds": build_s,
                "sha256": sha256_file(tmp / "lib.so"),
                "inputs": names[0],
                "outputs": names[1],
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            trust.record_built(meta["sha256"])  # this machine built it: later loads may use it
            if cache_dir.exists():
                shutil.rmtree(cache_dir, ignore_errors=True)
            os.replace(tmp, cache_dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if cross:
                raise BackendError(f"tvm: cannot write the cross-compiled library into {cache_dir}: {exc}") from exc
            return TvmProgram(ex, *names, False, build_s)  # read-only artifact dir: run without caching
        lib = cache_dir / "lib.so"
        if options.get("sign_key"):
            trust.sign(lib, meta["sha256"], Path(options["sign_key"]))
        if ship:
            _ship(artifact, lib, meta, meta["sha256"])
        if cross:
            return CrossCompiledProgram(lib, *names, meta["arch"], False, build_s)
        opened = trust.open_compiled(artifact, _rel(artifact, lib))
        try:
            if opened.sha256 != meta["sha256"]:
                raise BackendError(f"tvm: {lib} changed right after it was built; not loading it")
            return TvmProgram(trust.load_native(opened, tvm.runtime.load_module), *names, False, build_s, library=lib)
        finally:
            os.close(opened.fd)


def _say(options: dict[str, Any], message: str) -> None:
    if options.get("progress", True):
        print(message, file=sys.stderr, flush=True)
