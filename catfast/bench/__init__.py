"""The ``catfast bench`` commands: each compares catfast with the baseline a user would otherwise run, in
one process, interleaved, and reports ratios, FLOPs and memory next to times (docs/design.md, "Adding a
kernel"). ``train_step`` (CAT step modes against today's CAT code, re-implemented in ``contestants``),
``onnx`` (ONNX Runtime against PyTorch), ``serve`` (the serving engine against diffusers), ``merge`` (the
C++ multi-layer merge against torch); ``measure`` holds what they share (FLOP counter, errors, git commit).
benchmarks/ holds the scripts that run them at the published sizes, and their results.

This package imports nothing at import time: each command's module loads its own dependencies.
"""
