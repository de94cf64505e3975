"""A small ONNX graph builder whose weights stream straight into an external-data file.

Nodes are added with ``b.MatMul(x, w)``-style calls that return value names. Weights are written
to disk the moment they are added (4 KiB aligned, so backends can memory-map them), part by part
(a row slice, an expert), so exporting holds a few parts of the checkpoint in memory, never a whole
tensor. Parts may be produced (read, converted, quantized) by a few threads at once, and are
written in order.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import ops
from .outdir import naming

OPSET = 18
ALIGN = 4096

STORAGE_DTYPES: dict[str, np.dtype] = {
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}
_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(np.uint8): TensorProto.UINT8,
}


def onnx_type(dtype: np.dtype) -> int:
    return _ONNX_TYPES[np.dtype(dtype)]


class WeightFile:
    """Appends tensors to one external-data file and describes them as ONNX initializers.

    A failed write (a full disk) raises OSError naming this file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f: BinaryIO = open(self.path, "wb")
        self.offset = 0
        self.nbytes = 0

    def _write(self, data: bytes | np.ndarray) -> None:
        with naming(self.path):
            self._f.write(data)

    def write_parts(
        self, name: str, parts: Iterable[np.ndarray], shape: tuple[int, ...], dtype: np.dtype
    ) -> TensorProto:
        """Write a tensor as consecutive parts (e.g. one expert at a time) without joining them in memory."""
        pad = (-self.offset) % ALIGN
        if pad:
            self._write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for part in parts:
            data = np.ascontiguousarray(part, dtype=dtype)
            self._write(data.reshape(-1).view(np.uint8))  # the array's own bytes, not a copy
            self.offset += data.nbytes
            del data, part
        length = self.offset - start
        if length != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{name}: parts do not add up to shape {shape}")
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = onnx_type(dtype)
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.nbytes += length
        return tensor

    def close(self, sync: bool = False) -> None:
        """Flush and close the file; with ``sync`` also fsync it, so it is on disk before the artifact is renamed."""
        with naming(self.path):
            self._f.flush()
            if sync:
                os.fsync(self._f.fileno())
            self._f.close()

    def discard(self) -> None:
        """Close without raising (after a failure, when the file is deleted anyway); a no-op once closed."""
        with contextlib.suppress(OSError):
            self._f.close()


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _pread_all(fd: int, out: np.ndarray, offset: int) -> int:
    view, done = memoryview(out), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            break
        done += got
    return done


def in_order(jobs: list[Callable[[], Any]], workers: int) -> Iterator[Any]:
    """The jobs' results in order, computed by ``workers`` threads while the consumer uses the
    previous result: at most ``workers + 1`` results exist at once (so memory stays bounded). A job's
    exception is raised in its turn, and the jobs not yet started are dropped."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job()
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="moeport-export")
    pending: deque[Future] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class GraphBuilder:
    """Builds one ONNX graph; ``b.OpType(*inputs, **attrs)`` adds a node and returns its output name."""

    def __init__(self, weights: WeightFile, storage: str = "fp32", workers: int = 1):
        """``workers`` threads produce a tensor's parts at once (numpy releases the GIL)."""
        self.weights = weights
        self.workers = workers
        self.storage = STORAGE_DTYPES[storage]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._scope: list[str] = []
        self._counter = 0
        self._consts: dict[tuple, str] = {}
        self.functions: dict[str, onnx.FunctionProto] = {}

    # -- naming -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _fresh(self, hint: str) -> str:
        self._counter += 1
        prefix = "/".join(self._scope)
        return f"{prefix}/{hint}_{self._counter}" if prefix else f"{hint}_{self._counter}"

    # -- nodes --------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs: Any) -> Any:
        outs = [self._fresh(op_type) for _ in range(outputs)]
        node = helper.make_node(
            op_type, list(inputs), outs, name=self._fresh(op_type + "_node"), domain=domain, **attrs
        )
        self.nodes.append(node)
        return outs[0] if outputs == 1 else outs

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)

    def const(self, value: Any, dtype: Any = None) -> str:
        """A small constant embedded in the graph (shared between identical uses)."""
        arr = np.asarray(value, dtype=dtype)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    # -- weights ------------------------------------------------------------------------------
    def weight(self, name: str, array: np.ndarray, keep_fp32: bool = False, cast: bool = True) -> str:
        """Store a checkpoint tensor (float32 in) in the storage dtype; returns a float32 value name.

        ``keep_fp32`` keeps precision-critical small tensors (norms, router) in float32. Weights stored
        narrower are followed by a Cast so the graph computes in float32, unless ``cast`` is False
        (the caller casts after, e.g., a Gather).
        """
        return self.weight_stack(name, [lambda: array], tuple(np.shape(array)), keep_fp32, cast)

    def weight_stack(
        self,
        name: str,
        parts: list[Callable[[], np.ndarray]],
        shape: tuple[int, ...],
        keep_fp32: bool = False,
        cast: bool = True,
    ) -> str:
        """Like :meth:`weight` for a tensor made of consecutive parts, each produced (and freed) in turn."""
        dtype = np.dtype(np.float32) if keep_fp32 else self.storage
        self.tensor(name, [lambda make=make: np.asarray(make(), dtype=np.float32) for make in parts], shape, dtype)
        if dtype == np.float32 or not cast:
            return name
        return self.Cast(name, to=TensorProto.FLOAT)

    def tensor(self, name: str, parts: list[Callable[[], np.ndarray]], shape: tuple[int, ...], dtype: Any) -> str:
        """Store a tensor of exactly ``dtype`` (e.g. uint8 codes), streamed part by part."""
        if name in self._names:
            raise ValueError(f"weight {name!r} added twice")
        self._names.add(name)
        dtype = np.dtype(dtype)

        def produce(make: Callable[[], np.ndarray]) -> np.ndarray:
            return np.ascontiguousarray(np.asarray(make()).astype(dtype, copy=False))

        stored = in_order([partial(produce, make) for make in parts], self.workers)
        self.initializers.append(self.weights.write_parts(name, stored, shape, dtype))
        return name

    def call(self, function: onnx.FunctionProto, *inputs: str) -> str:
        """A node running one of moeport's own operators (registered once with its reference body)."""
        self.functions.setdefault(function.name, function)
        return self.op(function.name, *inputs, domain=function.domain)

    def quantized(
        self, name: str, parts: list[Callable[[], np.ndarray]], shape: tuple[int, ...], bits: int, block: int
    ) -> tuple[str, str]:
        """Store a float32 weight [..., N, K], given as consecutive row slices, block-quantized: codes
        ``name.codes`` uint8 [..., K*bits/8], then scales ``name.scales`` float32 [..., K/block].

        Each slice's codes are written as soon as it is quantized; its scales (a quarter of the codes'
        bytes at 4 bits and block 32: too many to hold for DeepSeek-V3's experts) go to an unnamed
        scratch file beside the weights, in order, and are copied after the codes. Quantization works
        block by block, so the bytes do not depend on how the rows are split."""
        *lead, k = shape
        with naming(self.weights.path), tempfile.TemporaryFile(dir=self.weights.path.parent) as scratch:
            fd, lock = scratch.fileno(), threading.Lock()
            ready: dict[int, np.ndarray] = {}
            flushed = [0, 0]  # parts and bytes written to the scratch file so far

            def codes(i: int) -> np.ndarray:
                c, s = ops.quantize_blocks(parts[i](), bits, block)
                with lock:  # parts finish out of order: write the scales of those next in line
                    ready[i] = s
                    while flushed[0] in ready:
                        data = np.ascontiguousarray(ready.pop(flushed[0]), np.float32).reshape(-1).view(np.uint8)
                        _pwrite_all(fd, data, flushed[1])
                        flushed[0] += 1
                        flushed[1] += data.nbytes
                return c

            c = self.tensor(
                name + ".codes", [partial(codes, i) for i in range(len(parts))], (*lead, k * bits // 8), np.uint8
            )
            total = flushed[1]
            step = 16 << 20

            def chunk(offset: int) -> np.ndarray:
                data = np.empty(min(step, total - offset) // 4, np.float32)
                if _pread_all(fd, data.view(np.uint8), offset) != data.nbytes:
                    raise OSError(f"scratch file of {name}: short read")
                return data

            scales = [partial(chunk, offset) for offset in range(0, total, step)]
            sc = self.tensor(name + ".scales", scales, (*lead, k // block), np.float32)
        return c, sc

    # moeport's operators (see exporter/ops.py for their definitions)
    quantize_blocks = staticmethod(ops.quantize_blocks)

    def qlinear(self, x: str, codes: str, scales: str, bits: int, block: int) -> str:
        name = ops.op_type("QLinear", bits, block)
        return self.call(self.functions.get(name) or ops.qlinear_function(name, bits, block), x, codes, scales)

    def latent_attention(self, q: str, past: str, new: str, allowed: str, scale: float) -> str:
        fn = self.functions.get("LatentAttention") or ops.latent_attention_function()
        return self.call(fn, q, past, new, allowed, self.const(scale, np.float32))

    def moe(self, x: str, idx: str, weights: str, gate_up: str, down: str) -> str:
        return self.call(self.functions.get("MoE") or ops.moe_function("MoE"), x, idx, weights, gate_up, down)

    def qmoe(
        self,
        x: str,
        idx: str,
        weights: str,
        gu_codes: str,
        gu_scales: str,
        down_codes: str,
        down_scales: str,
        bits: int,
        block: int,
    ) -> str:
        name = ops.op_type("QMoE", bits, block)
        fn = self.functions.get(name) or ops.qmoe_function(name, bits, block)
        return self.call(fn, x, idx, weights, gu_codes, gu_scales, down_codes, down_scales)

    # -- graph I/O ----------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: list[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list[Any]) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name], name=self._fresh("output")))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, graph_name: str, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        domains = sorted({f.domain for f in self.functions.values()})
        opsets += [helper.make_opsetid(d, 1) for d in domains]
        model = helper.make_model(
            graph, opset_imports=opsets, producer_name="moeport", functions=list(self.functions.values())
        )
        model.ir_version = 8
        model.doc_string = doc
        return model
