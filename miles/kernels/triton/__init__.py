"""Triton kernels for CUDA (the one place Triton is imported; see ``tests/test_imports.py``).

Nothing outside this package imports Triton, and nothing imports this package at module level:
``miles.kernels.batch_invariant`` imports its modules inside functions, on CUDA only, so a CPU
install (or ``miles --help``) never loads Triton.
"""
