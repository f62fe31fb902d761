"""The numpy backend's panel kernel (whisper_mlx/backends/numpy_backend/panels.py), an optional C
extension: without a C compiler the package installs without it and those products go to the BLAS.
Everything else is configured in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "whisper_mlx.backends.numpy_backend._panel_products",
            sources=["csrc/panel_products.c"],
            depends=["csrc/panel_body.h", "csrc/attention_body.h"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
