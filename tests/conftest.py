"""Test-session setup: Triton kernels run on the CPU interpreter when there is no CUDA device. This
must be set before any catfast kernel module is imported (triton reads it when kernels are defined)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
