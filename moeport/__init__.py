"""moeport: export DeepSeek-style MoE checkpoints to ONNX and run them on pluggable backends.

The package's code lives in the repository's top-level folders (models/, exporter/, backends/,
runtime/, tools/), installed as ``moeport.models``, ``moeport.exporter`` and so on.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(artifact_dir, backend="cpu", **options):
    """Load an exported artifact on a backend; see :func:`moeport.runtime.load`."""
    from moeport.runtime import load as _load

    return _load(artifact_dir, backend=backend, **options)
