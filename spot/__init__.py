"""spot: the lean Surgical Post-Training (SPoT) trainer and data pipeline.

It uses only the public API of ``spot_kernels``.
"""
__version__ = "0.1.0"
