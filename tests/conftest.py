"""Test-session setup: Triton kernels run on the CPU interpreter when there is no CUDA device. This
must be set before any catfast kernel module is imported (triton reads it when kernels are defined)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread(monkeypatch):
    """One test on one torch thread and the row-planned op's torch backend. Tiny shapes gain nothing from
    intra-op threads, and on shared cores OpenMP's spin-waiting made the sampler tests take 75 s instead of
    11 s (measured on the 2-core dev machine under load); TRITON_INTERPRET=1 above would run every LoRA layer
    of every sampler step in the Triton interpreter (minutes), and the kernels have their own interpreter
    tests. A whole module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
