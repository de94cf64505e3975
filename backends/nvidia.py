"""The ``nvidia`` backend: ONNX Runtime's CUDA execution provider on the neutral artifact.

Compiling reuses the cpu backend's rewrite into ORT's fused kernels where ORT has CUDA kernels for
them at float32 activations: ``QLinear`` -> ``MatMulNBits`` and ``MoE`` -> ``com.microsoft.MoE``.
``QMoE`` keeps its reference body by default (gather the chosen experts' int4/int8 weights,
dequantize, MatMul: standard ops that all run on the GPU), because ORT's CUDA ``QMoE`` kernel takes
float16/bfloat16 activations and the artifact computes in float32; a node with no CUDA kernel would
otherwise fall back to the CPU with a copy each way.

Options: ``device_id`` (default 0); ``moe_kernels`` ``auto`` (above) / ``fused`` (rewrite QMoE too)
/ ``reference`` (keep both MoE bodies); ``reference=True`` keeps every reference body;
``cpu_fallback`` (default True; False makes loading fail if any node would not run on the GPU);
``tf32`` (default False: float32 matmuls stay float32).

The latent KV cache is owned by the runtime as host arrays, so each step copies the past cache to
the device and the new rows back; keeping it on the device needs a runtime-owned device cache
(ORT IO binding with OrtValues), which the backend interface does not have yet.

Written without a GPU at hand: tests/test_nvidia_backend.py checks the prepared graph on ORT's CPU
provider everywhere, and runs it on CUDA against the cpu backend where a device exists.
"""

from __future__ import annotations

import ctypes
from typing import Any

import onnx
import onnx.inliner

from moeport.exporter.manifest import Artifact
from moeport.exporter.ops import DOMAIN

from .base import API_VERSION, Availability, BackendError, flag, integer
from .cpu import OrtProgram, rewrite_for_ort

EXTRA = "pip uninstall onnxruntime, then pip install 'moeport[nvidia]'"
_CUDA_SUCCESS, _CUDA_ERROR_NO_DEVICE = 0, 100


def cuda_devices() -> tuple[int, str]:
    """(number of CUDA devices, why none) from the NVIDIA driver API, without any CUDA toolkit."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1 not found)"
    rc = cuda.cuInit(0)
    if rc == _CUDA_ERROR_NO_DEVICE:
        return 0, "no CUDA device"
    if rc != _CUDA_SUCCESS:
        return 0, f"the NVIDIA driver failed to initialize (cuInit error {rc})"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != _CUDA_SUCCESS or count.value == 0:
        return 0, "no CUDA device"
    return count.value, ""


def prepare_for_cuda(model: onnx.ModelProto, moe_kernels: str = "auto") -> onnx.ModelProto:
    """The artifact's graph with ORT's fused kernels where CUDA has them (see the module docstring)."""
    if moe_kernels not in ("auto", "fused", "reference"):
        raise BackendError(f"nvidia: moe_kernels must be auto, fused or reference, not {moe_kernels!r}")
    # the reference bodies kept (inlined): LatentAttention always (CUDA has no kernel of it here)
    keep = ("LatentAttention", *{"auto": ("QMoE",), "fused": (), "reference": ("MoE", "QMoE")}[moe_kernels])
    chosen = [(f.domain, f.name) for f in model.functions if f.domain == DOMAIN and f.name.split("_")[0] in keep]
    if chosen:
        model = onnx.inliner.inline_selected_functions(model, chosen)
    rewrite_for_ort(model, accuracy_level=0)  # float32 activations: the GPU kernels' own precision
    return model


def session_for(artifact: Artifact, model: onnx.ModelProto, providers: list, cpu_fallback: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(artifact.directory))
    if not cpu_fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)


class NvidiaBackend:
    name = "nvidia"
    description = "ONNX Runtime, CUDA execution provider (MatMulNBits, fused MoE kernels)"
    priority = 20
    api_version = API_VERSION
    options = {
        "reference": "keep moeport's operators as their reference ONNX bodies",
        "moe_kernels": "MoE kernels: auto, fused or reference",
        "device_id": "CUDA device (default 0)",
        "tf32": "allow TF32 matmuls (default false)",
        "cpu_fallback": "let ONNX Runtime run unsupported nodes on the CPU (default true)",
    }

    def availability(self) -> Availability:
        count, no_device = cuda_devices()
        device = f"; {no_device}" if no_device else ""
        try:
            import onnxruntime as ort
        except ImportError:
            return Availability(False, f"onnxruntime-gpu not installed ({EXTRA}){device}")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return Availability(
                False,
                f"onnxruntime-gpu not installed: onnxruntime {ort.__version__} has no CUDA execution provider "
                f"({EXTRA}){device}",
            )
        if not count:
            return Availability(False, no_device)
        return Availability(True, f"onnxruntime-gpu {ort.__version__}, {count} CUDA device(s)")

    def compile(self, artifact: Artifact, options: dict[str, Any]) -> OrtProgram:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* pip packages, when installed that way
            try:
                ort.preload_dlls()
            except Exception:
                pass
        model = artifact.load_graph()  # parsed from the verified file, I/O and external data checked
        if not flag(options.get("reference", False), "reference", "nvidia"):
            model = prepare_for_cuda(model, str(options.get("moe_kernels", "auto")))
        # TF32 matmuls would round float32 activations to 10-bit mantissas: off unless asked for
        cuda_options = {
            "device_id": integer(options.get("device_id", 0), "device_id", "nvidia", 0, 1024),
            "use_tf32": int(flag(options.get("tf32", False), "tf32", "nvidia")),
        }
        cuda = ("CUDAExecutionProvider", cuda_options)
        try:
            fallback = flag(options.get("cpu_fallback", True), "cpu_fallback", "nvidia")
            session = session_for(artifact, model, [cuda, "CPUExecutionProvider"], fallback)
        except Exception as exc:
            raise BackendError(f"nvidia: onnxruntime could not load {artifact.graph_path}: {exc}") from exc
        artifact.check_unchanged(*artifact.external_files)  # ONNX Runtime opened these by path
        if session.get_providers()[0] != "CUDAExecutionProvider":  # ORT falls back silently when CUDA fails
            raise BackendError(
                "nvidia: ONNX Runtime could not start its CUDA execution provider (CUDA 12 / cuDNN 9 libraries "
                "missing? pip install 'onnxruntime-gpu[cuda,cudnn]')"
            )
        return OrtProgram(session, backend="nvidia")
