"""Benchmarks of fastbn against PyTorch, the NumPy reference and a plain copy (the memory floor).

``python -m benchmarks.bench_cpu --help``; the method is in docs/benchmarks.md.
"""
