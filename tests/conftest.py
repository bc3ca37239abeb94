import os
import pathlib
import sys
import tempfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
# A private Inductor cache per test session: a shared cache can serve code compiled against an
# older fake implementation of our op.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="attnfuse-inductor-"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def _ensure_backend() -> None:
    """``backend="attnfuse"`` comes from the package's entry point; a checkout used without ``pip install``
    (e.g. only on ``PYTHONPATH``) registers it here so the tests still name it as users do."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    if "attnfuse" not in list_backends(exclude_tags=()):
        from attnfuse.backend import attnfuse_backend

        register_backend(attnfuse_backend, "attnfuse")


_ensure_backend()
