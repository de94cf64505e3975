"""The ``tvm`` backend (feasibility spike): Apache TVM Relax compiles the neutral artifact for ``llvm``.

Compiling inlines moeport's model-local functions (``onnx.inliner``: the reference decompositions of
``MoE`` / ``QMoE`` / ``QLinear``), applies a few shape-preserving rewrites that Relax's ONNX importer
needs to keep every tensor's shape known with symbolic ``batch``/``seq``/``past`` dims, imports with
``tvm.relax.frontend.onnx.from_onnx``, builds with ``tvm.relax.build(mod, target)`` and runs on
``tvm.relax.VirtualMachine``. One library serves every prompt length (no recompilation).

The built library is cached in ``<artifact>/compiled/tvm-<key>/`` (``lib.so`` + ``meta.json``, written
to a temporary directory and renamed into place) and loaded with ``tvm.runtime.load_module`` on later
loads. Options: ``target`` (default ``llvm``), ``cache`` (default True), ``rebuild`` (force).

A compiled library is native code: a cached one is loaded only if its sha256 is one this machine
recorded when it built it (``~/.cache/moeport/trusted-libraries.json``); a library found in an
artifact from elsewhere is never loaded, it is rebuilt. (Shipping prebuilt libraries with their
checksums in the manifest, for runtime-only deployment, is issue D's next step.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from moeport.exporter.manifest import Artifact, read_json_or, sha256_file, user_cache_file, write_json_best_effort

from .base import API_VERSION, Availability, BackendError

_PREP_VERSION = 1  # bump when the graph rewrites below change (invalidates cached libraries)


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


class TvmProgram:
    """A Relax VM over the built library; inputs are passed positionally in graph-input order."""

    def __init__(self, lib: Any, input_names: list[str], output_names: list[str], cache_hit: bool, build_s: float):
        import tvm
        from tvm import relax

        self._tvm = tvm
        self.lib = lib
        self.vm = relax.VirtualMachine(lib, tvm.cpu())
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.cache_hit = cache_hit
        self.build_seconds = build_s

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
        out = self.vm["main"](*args)
        outs = [out[i] for i in range(len(out))] if len(self.output_names) > 1 else [out]
        return {n: o.numpy() for n, o in zip(self.output_names, outs, strict=True)}


def _cache_key(artifact: Artifact, target: str, tvm_version: str) -> str:
    h = hashlib.sha256()
    files = artifact.manifest.get("files", {})
    h.update(json.dumps({k: v.get("sha256") for k, v in sorted(files.items())}, sort_keys=True).encode())
    h.update(f"{target}|{tvm_version}|{_PREP_VERSION}".encode())
    h.update(Path(__file__).read_bytes())  # the graph rewrites and build steps in this file
    return h.hexdigest()[:16]


_TRUSTED = "trusted-libraries.json"


def _trusted() -> set[str]:
    return set(read_json_or(user_cache_file(_TRUSTED), []))


def _trust(lib: Path) -> None:
    """Record a library this process built, so later loads may use it (without a writable cache the
    library is simply rebuilt next time)."""
    write_json_best_effort(user_cache_file(_TRUSTED), sorted(_trusted() | {sha256_file(lib)}))


class TvmBackend:
    name = "tvm"
    description = "Apache TVM Relax, compiled for the host CPU (llvm); reference MoE/QLinear bodies"
    priority = 5
    api_version = API_VERSION

    def availability(self) -> Availability:
        try:
            import tvm
        except Exception:
            return Availability(False, "apache-tvm not installed (pip install 'moeport[tvm]')")
        return Availability(True, f"apache-tvm {tvm.__version__}")

    def compile(self, artifact: Artifact, options: dict[str, Any]) -> TvmProgram:
        import tvm
        from tvm import relax

        target = str(options.get("target") or "llvm")
        graph = onnx.load(str(artifact.graph_path), load_external_data=False)
        input_names = [i.name for i in graph.graph.input]
        output_names = [o.name for o in graph.graph.output]
        key = _cache_key(artifact, target, tvm.__version__)
        cache_dir = Path(artifact.directory) / "compiled" / f"tvm-{key}"
        lib_path, meta_path = cache_dir / "lib.so", cache_dir / "meta.json"
        use_cache = options.get("cache", True)
        if use_cache and not options.get("rebuild") and lib_path.is_file() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                trusted = sha256_file(lib_path) in _trusted()  # native code: only what this machine built
                if trusted and meta.get("key") == key and meta.get("tvm") == tvm.__version__:
                    lib = tvm.runtime.load_module(str(lib_path))
                    return TvmProgram(lib, input_names, output_names, True, 0.0)
            except Exception:
                pass  # a damaged cache entry: rebuild below
        start = time.perf_counter()
        try:
            model = onnx.load(str(artifact.graph_path))  # external data loads with it
            model = onnx.inliner.inline_local_functions(model)
            prepare_graph(model)
            from tvm.relax.frontend.onnx import from_onnx

            with warnings.catch_warnings():  # "Renaming name past_latent.0 to past_latent_0": inputs are positional
                warnings.simplefilter("ignore")
                mod = from_onnx(model, keep_params_in_input=False)
            ex = relax.build(mod, target=target)
        except Exception as exc:
            raise BackendError(f"tvm: could not compile {artifact.graph_path}: {exc}") from exc
        build_s = time.perf_counter() - start
        if not use_cache:
            return TvmProgram(ex, input_names, output_names, False, build_s)
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tvm-{key}-", dir=cache_dir.parent))
        try:
            ex.export_library(str(tmp / "lib.so"))
            meta = {
                "key": key,
                "tvm": tvm.__version__,
                "target": target,
                "build_seconds": build_s,
                "inputs": input_names,
                "outputs": output_names,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            _trust(tmp / "lib.so")
            if cache_dir.exists():
                shutil.rmtree(cache_dir, ignore_errors=True)
            os.replace(tmp, cache_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # read-only artifact dir: run without caching
            return TvmProgram(ex, input_names, output_names, False, build_s)
        lib = tvm.runtime.load_module(str(lib_path))
        return TvmProgram(lib, input_names, output_names, False, build_s)
