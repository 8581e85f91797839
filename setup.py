"""Builds the Linux BLAS shim (mlx_engine/blas_shim.c); all other metadata is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and MLX keeps its
reference BLAS, which the CLIs then name in one line with the fix.
"""

import sys

from setuptools import Extension, setup

shim = Extension("mlx_engine._cblas_shim", ["mlx_engine/blas_shim.c"], optional=True)
setup(ext_modules=[shim] if sys.platform.startswith("linux") else [])
