"""The ``cpu`` backend: ONNX Runtime's CPU execution provider on the neutral artifact."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from moeport.exporter.manifest import Artifact

from .base import API_VERSION, Availability, BackendError


class OrtProgram:
    """An ONNX Runtime session over the artifact's graph."""

    def __init__(self, session: Any):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs, strict=True))


class CpuBackend:
    name = "cpu"
    description = "ONNX Runtime, CPU execution provider"
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

        so = ort.SessionOptions()
        threads = int(options.get("threads") or os.cpu_count() or 1)
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(artifact.graph_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"cpu: onnxruntime could not load {artifact.graph_path}: {exc}") from exc
        return OrtProgram(session)
