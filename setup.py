"""Builds moeport's native CPU kernels (backends/csrc) next to the Python package.

Everything else is declared in pyproject.toml. The kernels are a plain shared library that ONNX
Runtime loads as a custom-op library (no Python C API). The build is optional: without a C compiler
moeport still installs, and the cpu backend falls back to widening half-precision weights to float32
(``moeport backends`` says which).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "moeport.backends._kernels",
            sources=["backends/csrc/kernels.c", "backends/csrc/attention.c", "backends/csrc/ort_ops.c"],
            depends=["backends/csrc/kernels.h", "backends/csrc/ort_abi.h"],
            extra_compile_args=["-O3", "-std=gnu11", "-fvisibility=hidden"],
            libraries=["m"],
            optional=True,
        )
    ]
)
