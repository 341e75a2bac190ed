"""Throughput benchmarks: python -m dino_jax.bench.<name>."""
