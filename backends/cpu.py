"""The ``cpu`` backend: ONNX Runtime's CPU execution provider on the neutral artifact.

Compiling rewrites moeport's own operators into ONNX Runtime's fused kernels, reading the same
weight bytes from the artifact's external data (nothing is copied or re-quantized):

- ``QLinear`` (block-quantized Linear) -> ``com.microsoft.MatMulNBits``
- ``MoE`` (float experts) -> ``com.microsoft.MoE``: the routed experts only, tokens grouped by expert.
  DeepSeek's routing weights are passed as log-weights of the chosen experts (others at a large
  negative sentinel), so the kernel's softmax over them gives ``w / sum(w)``; the output is then
  multiplied by ``sum(w)``, which restores the weights exactly.
- ``QMoE`` (quantized experts) -> ``com.microsoft.QMoE`` with ``router_weights``: selection and
  weighting are given separately, as DeepSeek's grouped, biased routing needs.

Options: ``threads``; ``accuracy_level`` of the quantized kernels (4, the default, lets them quantize
activations to int8 per block on the fly as llama.cpp's Q4/Q8 dot products do — on this CPU class
the fast int8/int4 kernels exist only in that mode; 0 keeps float32 activations, exact but far
slower at 8 bits); ``reference=True`` keeps the reference decompositions instead (for checking).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moeport.exporter.manifest import Artifact
from moeport.exporter.ops import DOMAIN, parse_op_type, top_k_constant

from .base import API_VERSION, Availability, BackendError

MS = "com.microsoft"
_SENTINEL = -1.0e30
# silu(gate) * up with gate/up rows interleaved in one fc1 (the layout ORT's CPU MoE kernels accept);
# routing weights are supplied by the graph, so the kernel must not renormalize them
_SWIGLU = dict(
    activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=0
)


class OrtProgram:
    """An ONNX Runtime session over the (rewritten) graph."""

    def __init__(self, session: Any):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs, strict=True))


class CpuBackend:
    name = "cpu"
    description = "ONNX Runtime, CPU execution provider (MatMulNBits, fused MoE kernels)"
    priority = 10
    api_version = API_VERSION

    def availability(self) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Availability(False, f"onnxruntime not installed ({exc})")
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return Availability(False, "onnxruntime has no CPUExecutionProvider")
        return Availability(True, f"onnxruntime {ort.__version__}")

    def compile(self, artifact: Artifact, options: dict[str, Any]) -> OrtProgram:
        import onnxruntime as ort

        so = session_options(options.get("threads"), artifact.directory)
        model = onnx.load(str(artifact.graph_path), load_external_data=False)
        if not options.get("reference"):
            rewrite_for_ort(model, accuracy_level=int(options.get("accuracy_level", 4)))
        try:
            session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"cpu: onnxruntime could not load {artifact.graph_path}: {exc}") from exc
        return OrtProgram(session)


def session_options(threads: int | None, weights_dir: Any, optimization: str = "ORT_ENABLE_ALL") -> Any:
    """ONNX Runtime session options of moeport's CPU sessions: ``threads`` intra-op threads (default every
    core), one inter-op thread, quiet logs, external weights read from ``weights_dir``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    so.log_severity_level = 3
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return so


def _reshaped(tensor: TensorProto, name: str, dims: list[int]) -> TensorProto:
    """The same stored bytes (external data or raw) seen with other dims: no copy of the weights."""
    out = TensorProto()
    out.CopyFrom(tensor)
    out.name = name
    del out.dims[:]
    out.dims.extend(dims)
    return out


def rewrite_for_ort(model: onnx.ModelProto, accuracy_level: int = 4, moe_accuracy_level: int | None = None) -> None:
    """Replace moeport's operators by ONNX Runtime's fused CPU kernels, in place."""
    if moe_accuracy_level is None:
        moe_accuracy_level = accuracy_level
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    counter = [0]

    def fresh(hint: str) -> str:
        counter[0] += 1
        return f"ort_{hint}_{counter[0]}"

    def node(op: str, inputs: list[str], domain: str = "", **attrs: Any) -> str:
        out = fresh(op)
        new_nodes.append(helper.make_node(op, inputs, [out], name=fresh(op + "_node"), domain=domain, **attrs))
        return out

    def const(value: Any, dtype: Any) -> str:
        name = fresh("const")
        new_inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def initializer_behind(value: str) -> TensorProto:
        """The initializer a value comes from (directly or through a Cast of a narrower storage dtype)."""
        if value in inits:
            return inits[value]
        src = producers.get(value)
        if src is not None and src.op_type == "Cast" and src.input[0] in inits:
            return inits[src.input[0]]
        raise BackendError(f"cpu: expected a weight initializer behind {value!r}")

    def scatter_rows(idx: str, values: str, fill: float, n_experts: int) -> str:
        rows = node("Slice", [node("Shape", [idx]), const([0], np.int64), const([1], np.int64)])
        base = node(
            "ConstantOfShape",
            [node("Concat", [rows, const([n_experts], np.int64)], axis=0)],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [fill]),
        )
        return node("ScatterElements", [base, idx, values], axis=1)

    def top_k(moe: onnx.NodeProto) -> int:
        """Experts per token: the constant k of the TopK that produced the MoE node's expert indices."""
        k = top_k_constant(producers.get(moe.input[1]), inits)
        if k is None:
            raise BackendError(f"cpu: cannot find the number of experts per token of {moe.name}")
        return k

    for n in graph.node:
        if n.domain != DOMAIN:
            new_nodes.append(n)
            continue
        kind, bits, block = parse_op_type(n.op_type)
        if kind == "QLinear":
            x, codes, scales = n.input
            c, s = inits[codes], inits[scales]
            rows, k = c.dims[0], c.dims[1] * 8 // bits
            b = _reshaped(c, fresh("B"), [rows, k // block, block * bits // 8])
            sc = _reshaped(s, fresh("scales"), [rows * (k // block)])
            new_inits += [b, sc]
            new_nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [x, b.name, sc.name],
                    list(n.output),
                    name=n.name,
                    domain=MS,
                    K=k,
                    N=rows,
                    bits=bits,
                    block_size=block,
                    accuracy_level=accuracy_level,
                )
            )
        elif kind == "MoE":
            x, idx, w, gate_up, down = n.input
            experts = initializer_behind(gate_up).dims[0]
            probs = scatter_rows(idx, node("Log", [node("Max", [w, const(1e-30, np.float32)])]), _SENTINEL, experts)
            y = node("MoE", [x, probs, gate_up, "", down], domain=MS, k=top_k(n), **_SWIGLU)
            total = node("ReduceSum", [w, const([-1], np.int64)], keepdims=1)
            new_nodes.append(helper.make_node("Mul", [y, total], list(n.output), name=n.name))
        elif kind == "QMoE":
            x, idx, w, gu_codes, gu_scales, down_codes, down_scales = n.input
            experts = inits[gu_codes].dims[0]
            ones = node(
                "ConstantOfShape", [node("Shape", [idx])], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
            )
            select = scatter_rows(idx, ones, 0.0, experts)
            weights = scatter_rows(idx, w, 0.0, experts)
            new_nodes.append(
                helper.make_node(
                    "QMoE",
                    [x, select, gu_codes, gu_scales, "", down_codes, down_scales, "", "", "", "", "", "", "", weights],
                    list(n.output),
                    name=n.name,
                    domain=MS,
                    k=top_k(n),
                    expert_weight_bits=bits,
                    block_size=block,
                    accuracy_level=moe_accuracy_level,
                    **_SWIGLU,
                )
            )
        else:
            new_nodes.append(n)  # an operator this backend has no fast form for: ORT runs its reference
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    used = {i for nd in graph.node for i in nd.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
