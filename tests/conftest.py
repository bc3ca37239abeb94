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


# The tests that run the Triton kernels (files named ``*_interpret.py``, beside the CPU and AOT tests of their
# module): on the CPU through Triton's interpreter, or on a CUDA GPU.  Triton decides at import time whether
# ``@triton.jit`` compiles or interprets, so on the CPU they need ``TRITON_INTERPRET=1`` in the environment of the
# whole pytest process: ``make test`` runs them in their own pytest invocation.  With ``ATTNFUSE_TEST_DEVICE=cuda``
# (on a GPU machine, without the interpreter) the same tests run compiled: every tensor they create lands on the
# GPU through ``torch.set_default_device``.  With neither they are skipped.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = os.environ.get("ATTNFUSE_TEST_DEVICE", "cpu")
ON_GPU = DEVICE == "cuda" and torch.cuda.is_available()


def _runs_the_kernels(path: pathlib.Path) -> bool:
    return path.name.endswith("_interpret.py")


def pytest_collection_modifyitems(config, items):
    if INTERPRETING or ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 for the whole pytest run (make test does that), "
                                   "or ATTNFUSE_TEST_DEVICE=cuda on a GPU")
    for item in items:
        if _runs_the_kernels(item.path):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _test_device(request):
    if not ON_GPU or not _runs_the_kernels(request.path):
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _ensure_backend() -> None:
    """``backend="attnfuse"`` comes from the package's entry point; a checkout used without ``pip install``
    (e.g. only on ``PYTHONPATH``) registers it here so the tests still name it as users do."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    if "attnfuse" not in list_backends(exclude_tags=()):
        from attnfuse.backend import attnfuse_backend

        register_backend(attnfuse_backend, "attnfuse")


_ensure_backend()


def _corpus_libs() -> None:
    """The corpus libraries that import torchvision live in ``.venv/corpus-libs`` (the Makefile installs them
    there, off the venv's own path; ``$ATTNFUSE_CORPUS_LIBS`` overrides the folder)."""
    default = pathlib.Path(__file__).resolve().parents[1] / ".venv" / "corpus-libs"
    folder = pathlib.Path(os.environ.get("ATTNFUSE_CORPUS_LIBS", default))
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.append(str(folder))


def _torchvision_schemas() -> None:
    """torchvision's wheel here is a CUDA build whose C++ ops do not load on the CPU torch; its import then
    fails registering fake kernels for ``torchvision::nms``.  Define the two schemas it needs, only when its
    own library did not load (so nothing is defined twice where the ops do load).  timm and open_clip import
    torchvision, the corpus tests (tests/models/corpus.py) use all three."""
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("_C*.so"))
    try:
        if libs:
            torch.ops.load_library(str(libs[0]))
    except OSError:
        pass
    if _has_schema("torchvision::nms"):
        return
    lib = torch.library.Library("torchvision", "DEF")  # kept on the function: it lives as long as the process
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_schemas.lib = lib


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(name, "")
    except RuntimeError:
        return False
    return True


_corpus_libs()
_torchvision_schemas()
