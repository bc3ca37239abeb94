"""Tests that run the Triton kernels on the CPU through Triton's interpreter.

Triton decides at import time whether ``@triton.jit`` compiles or interprets, so these
tests need ``TRITON_INTERPRET=1`` in the environment of the whole pytest process:
``make test`` runs them in their own pytest invocation.  Without it they are skipped.
"""

import os

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if INTERPRETING:
        return
    skip = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 for the whole pytest run (make test does that)")
    for item in items:
        if "tests/interpret" in str(item.fspath):
            item.add_marker(skip)
