"""Triton kernels, one file per op. Importing this package needs triton; fastattn imports it lazily."""
