"""Tests that run the Triton kernels: on the CPU through Triton's interpreter, or on a CUDA GPU.

Triton decides at import time whether ``@triton.jit`` compiles or interprets, so on the CPU these
tests need ``TRITON_INTERPRET=1`` in the environment of the whole pytest process: ``make test``
runs them in their own pytest invocation.  With ``ATTNFUSE_TEST_DEVICE=cuda`` (on a GPU machine,
without the interpreter) the same tests run compiled: every tensor they create lands on the GPU
through ``torch.set_default_device``.  With neither they are skipped.
"""

import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = os.environ.get("ATTNFUSE_TEST_DEVICE", "cpu")
ON_GPU = DEVICE == "cuda" and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if INTERPRETING or ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 for the whole pytest run (make test does that), "
                                   "or ATTNFUSE_TEST_DEVICE=cuda on a GPU")
    for item in items:
        if "tests/interpret" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _test_device():
    if not ON_GPU:
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)
