import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Overrides tests/conftest.py's reset per test: FlexAttention compiles once per configuration and these tests
    reuse the compiled callers (a reset would recompile each one, ~5-10 s on the CPU)."""
    torch.manual_seed(0)
    yield
