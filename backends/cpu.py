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
- bf16 / fp16 weights (``Gemm`` of a ``Cast`` weight, ``MoE`` of ``Cast`` experts) -> moeport's own
  kernels (``backends/csrc``, domain ``ai.moeport.cpu``), which read the stored 2-byte weights: ONNX
  Runtime has no bf16 MatMul on CPUs and would otherwise widen every weight to float32 at load
  (twice the bytes per token). Without the built kernels (no C compiler at install) that widening is
  what happens, and ``moeport backends`` says so.
- int8 / int4 weights (``QLinear``, ``QMoE``) -> the same library's ``LinearQ8/Q4``, ``MoEQ8/Q4`` when
  it is built: they read the artifact's codes and scales in place (no pre-packed copy, so a session
  loads in a fraction of a second and holds the weights once), decode with AVX512-VNNI byte products
  (AVX2 machines: int16 products; 4-bit codes at accuracy level 4, the ``Q4A8`` ops, with x rounded to
  int8 per block) and prefill on AMX tiles; ``quant_kernels=False`` keeps ONNX Runtime's
  ``MatMulNBits``/``QMoE``.
- per-head ``MatMul`` of a bf16 ``[H, K, N]`` weight (MLA's absorbed ``kv_b_proj``, stored bf16 in bf16 and
  int8/int4 artifacts) -> the same library's ``HeadsMatMulBf16``, reading the stored weights (ONNX
  Runtime would fold their Cast into float32 copies: twice the bytes per token, and held in memory).
- ``LatentAttention`` (MLA over the latent cache) -> the same library's fused ``LatentAttention``: one
  pass over the cache for all heads with an online softmax, the cache read in place (the reference is a
  chain of a dozen small ONNX nodes per layer, each reading or writing a [heads, positions] array);
  ``attention_kernels=False`` keeps the reference.

Options: ``threads``; ``half_kernels`` / ``quant_kernels`` / ``attention_kernels`` (default true:
moeport's kernels where built); ``accuracy_level`` of ONNX Runtime's quantized kernels (4, the
default, lets them quantize activations to int8 per block on the fly as llama.cpp's Q4/Q8 dot
products do — on this CPU class the fast int8/int4 kernels exist only in that mode; 0 keeps
float32 activations, exact but far slower at 8 bits); ``reference=True`` keeps the reference
decompositions instead (for checking).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from moeport.exporter.manifest import Artifact
from moeport.exporter.ops import DOMAIN, parse_op_type, top_k_constant

from .base import API_VERSION, Availability, BackendError, flag, integer

MS = "com.microsoft"
KERNELS_DOMAIN = "ai.moeport.cpu"
_HALF_SUFFIX = {TensorProto.BFLOAT16: "Bf16", TensorProto.FLOAT16: "Fp16"}
_SENTINEL = -1.0e30
# silu(gate) * up with gate/up rows interleaved in one fc1 (the layout ORT's CPU MoE kernels accept);
# routing weights are supplied by the graph, so the kernel must not renormalize them
_SWIGLU = dict(
    activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=0
)


class OrtProgram:
    """An ONNX Runtime session over the (rewritten) graph."""

    def __init__(
        self,
        session: Any,
        half_kernels: bool = False,
        quant_kernels: bool = False,
        attention_kernels: bool = False,
        backend: str = "cpu",
    ):
        self.session = session
        self.backend = backend
        self.half_kernels = half_kernels  # bf16/fp16 weights read as stored by moeport's kernels
        self.quant_kernels = quant_kernels  # int8/int4 weights on moeport's kernels (not MatMulNBits/QMoE)
        self.attention_kernels = attention_kernels  # LatentAttention on moeport's fused kernel
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as exc:  # ONNX Runtime's errors, named as the backend's
            raise BackendError(f"{self.backend}: onnxruntime failed to run a step: {_first_line(exc)}") from exc
        return dict(zip(self.output_names, outputs, strict=True))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]


class CpuBackend:
    name = "cpu"
    description = "ONNX Runtime, CPU execution provider (moeport's bf16/int8/int4 kernels, fused MoE kernels)"
    priority = 10
    api_version = API_VERSION
    options = {
        "reference": "keep moeport's operators as their reference ONNX bodies (for checking)",
        "half_kernels": "bf16/fp16 weights on moeport's kernels (default true where built)",
        "quant_kernels": "int8/int4 weights on moeport's kernels (default true where built)",
        "attention_kernels": "fused MLA attention kernel (default true where built)",
        "accuracy_level": "ONNX Runtime's MatMulNBits/QMoE accuracy level 0-4 (default 4)",
    }

    def availability(self) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Availability(False, f"onnxruntime not installed ({exc})")
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return Availability(False, "onnxruntime has no CPUExecutionProvider")
        lib, why = kernels_library()
        native = f"moeport kernels: {kernels_isa(lib)}" if lib else f"moeport kernels unavailable ({why})"
        return Availability(True, f"onnxruntime {ort.__version__}; {native}")

    def compile(self, artifact: Artifact, options: dict[str, Any]) -> OrtProgram:
        import onnxruntime as ort

        so = session_options(options.get("threads"), artifact.directory)
        model = artifact.load_graph()  # parsed from the verified file, I/O and external data checked
        ours: set[str] = set()
        accuracy = integer(options.get("accuracy_level", 4), "accuracy_level", "cpu", 0, 4)
        if not flag(options.get("reference", False), "reference", "cpu"):
            lib = kernels_library()[0]
            kinds = ("half_kernels", "quant_kernels", "attention_kernels")
            flags = {k: flag(options.get(k, True), k, "cpu") for k in kinds}
            rewrite_for_ort(
                model,
                accuracy_level=accuracy,
                **{k: lib is not None and v for k, v in flags.items()},
            )
            ours = {n.op_type for n in model.graph.node if n.domain == KERNELS_DOMAIN}
            if ours:
                so.register_custom_ops_library(str(lib))
        try:
            session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"cpu: onnxruntime could not load {artifact.graph_path}: {_first_line(exc)}") from exc
        artifact.check_unchanged(*artifact.external_files)  # ONNX Runtime opened these by path
        return OrtProgram(
            session,
            half_kernels=any(op.endswith(("Bf16", "Fp16")) for op in ours),
            quant_kernels=any(op.endswith(("Q8", "Q4")) for op in ours),
            attention_kernels="LatentAttention" in ours,
        )


def kernels_library() -> tuple[Path | None, str]:
    """moeport's native kernel library (built at install from backends/csrc), or None and why not."""
    here = Path(__file__).resolve().parent
    found = sorted(here.glob("_kernels.*.so")) + sorted(here.glob("_kernels.*.pyd")) + sorted(here.glob("_kernels.so"))
    if not found:
        return None, "not built: reinstall moeport with a C compiler (gcc or clang) present"
    return found[0], ""


def kernels_isa(lib: Path) -> str:
    """Which code path the kernel library runs on this CPU (``avx512`` or ``generic``)."""
    import ctypes

    fn = ctypes.CDLL(str(lib)).moeport_kernels_isa
    fn.restype = ctypes.c_char_p
    return fn().decode()


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


def set_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], new_inits: list[TensorProto]) -> None:
    """Give a rewritten graph its new nodes and initializers, dropping the initializers no node reads."""
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    used = {i for nd in graph.node for i in nd.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def rewrite_for_ort(
    model: onnx.ModelProto,
    accuracy_level: int = 4,
    moe_accuracy_level: int | None = None,
    half_kernels: bool = False,
    quant_kernels: bool = False,
    attention_kernels: bool = False,
) -> None:
    """Replace moeport's operators by fast CPU kernels, in place: ONNX Runtime's fused ones, or with
    ``half_kernels`` moeport's kernel library for bf16/fp16 weights (instead of widening them to float32),
    with ``quant_kernels`` for int8/int4 weights (instead of ``MatMulNBits``/``QMoE``) and with
    ``attention_kernels`` for ``LatentAttention`` (instead of its reference)."""
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

    def half_weight(value: str) -> TensorProto | None:
        """The bf16/fp16 initializer that ``value`` is the float32 Cast of, if half kernels take it directly."""
        src = producers.get(value)
        if not half_kernels or src is None or src.op_type != "Cast" or src.input[0] not in inits:
            return None
        tensor = inits[src.input[0]]
        return tensor if tensor.data_type in _HALF_SUFFIX else None

    def top_k(moe: onnx.NodeProto) -> int:
        """Experts per token: the constant k of the TopK that produced the MoE node's expert indices."""
        k = top_k_constant(producers.get(moe.input[1]), inits)
        if k is None:
            raise BackendError(f"cpu: cannot find the number of experts per token of {moe.name}")
        return k

    for n in graph.node:
        if n.op_type == "Gemm" and n.domain == "" and len(n.input) == 2 and (w := half_weight(n.input[1])) is not None:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0:
                op = "Linear" + _HALF_SUFFIX[w.data_type]
                new_nodes.append(
                    helper.make_node(op, [n.input[0], w.name], list(n.output), name=n.name, domain=KERNELS_DOMAIN)
                )
                continue
        if (
            n.op_type == "MatMul"
            and n.domain == ""
            and (w := half_weight(n.input[1])) is not None
            and w.data_type == TensorProto.BFLOAT16
            and len(w.dims) == 3
        ):  # per-head products with bf16 weights [H, K, N] (MLA's absorbed kv_b_proj), read as stored
            new_nodes.append(
                helper.make_node(
                    "HeadsMatMulBf16", list(n.input[:1]) + [w.name], list(n.output), name=n.name, domain=KERNELS_DOMAIN
                )
            )
            continue
        if n.domain != DOMAIN:
            new_nodes.append(n)
            continue
        kind, bits, block = parse_op_type(n.op_type)
        if kind == "LatentAttention" and attention_kernels:
            new_nodes.append(helper.make_node(kind, list(n.input), list(n.output), name=n.name, domain=KERNELS_DOMAIN))
        elif kind in ("QLinear", "QMoE") and quant_kernels and bits in (4, 8):
            # accuracy level 4 lets 4-bit products round x to int8 per block where that is the fast path
            # (AVX2 decode), as it lets MatMulNBits do; below 4, x keeps 15 bits as on the other paths
            op = (
                ("Linear" if kind == "QLinear" else "MoE")
                + f"Q{bits}"
                + ("A8" if bits == 4 and accuracy_level >= 4 else "")
            )
            new_nodes.append(helper.make_node(op, list(n.input), list(n.output), name=n.name, domain=KERNELS_DOMAIN))
        elif kind == "QLinear":
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
        elif (
            kind == "MoE"
            and (gu := half_weight(n.input[3])) is not None
            and (dn := half_weight(n.input[4])) is not None
        ):
            if gu.data_type != dn.data_type:
                raise BackendError(f"cpu: {n.name}: gate_up and down experts differ in dtype")
            op = "MoE" + _HALF_SUFFIX[gu.data_type]
            new_nodes.append(
                helper.make_node(
                    op, [*n.input[:3], gu.name, dn.name], list(n.output), name=n.name, domain=KERNELS_DOMAIN
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
    # drop the Casts whose float32 copies nothing reads any more (ORT would otherwise fold them at load)
    while True:
        used = {i for nd in new_nodes for i in nd.input} | {o.name for o in graph.output}
        dead = [nd for nd in new_nodes if nd.op_type == "Cast" and not any(o in used for o in nd.output)]
        if not dead:
            break
        new_nodes = [nd for nd in new_nodes if nd not in dead]
    set_nodes(graph, new_nodes, new_inits)
    for domain in (MS, KERNELS_DOMAIN):
        if not any(o.domain == domain for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(domain, 1))
