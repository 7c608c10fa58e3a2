"""Triton kernels and their launchers (import the module you need: each imports triton)."""

from collections import Counter

# Kernels started by catfast's Triton launchers in this process, by kernel: a Triton launch is not an aten op,
# so catfast.bench.launches adds these to the aten ops it counts (each is one launch)
launched: Counter[str] = Counter()
