"""Benchmarks of fastattn against PyTorch: ``python -m bench`` (see bench/README.md)."""
