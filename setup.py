"""Build script. Pure Python today; the CUDA extension ``spot_kernels._cuda`` is added here when
``csrc/`` has sources and ``nvcc`` is found (see the README's GPU build section)."""
from setuptools import setup

setup()
