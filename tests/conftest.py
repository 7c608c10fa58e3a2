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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The `tiny` factory model as a diffusers folder (a module's own ``tiny`` fixture wins over this one)."""
    from catfast.integrations.factory import init_model_folder

    return init_model_folder("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four captioned 32 px training images with the trigger sks (``catfast.testing.make_data``)."""
    from catfast.testing import make_data

    return make_data(tmp_path_factory.mktemp("data") / "stars")


# ---- the serving tests' server (tests/test_serve_http.py, tests/test_robust_*.py): one per test module


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, server): the shipped demo model on the CPU with a copy of the demo adapters in a folder of
    its own (max batch 4, queue 16), behind the HTTP app on a free loopback port."""
    from catfast.serve.loadtest import copy_demo_adapters, demo_server

    with demo_server(copy_demo_adapters(tmp_path_factory.mktemp("adapters")), max_batch=4, max_queue=16) as pair:
        yield pair


@pytest.fixture(scope="module")
def engine(served):
    return served[0]


@pytest.fixture(scope="module")
def server(served):
    return served[1]


@pytest.fixture(scope="module")
def folder(engine):
    return engine.adapters_dir


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
