"""The whole-model tests of tiny GPT-2 and LLaMA (GQA), rerun with the Triton kernels.

Under ``TRITON_INTERPRET=1`` the op runs `attnfuse.kernels.flash` on CPU tensors, so
these are the matcher/rewrite/op tests of ``tests/models/test_hf_models.py`` with the
real FlashAttention kernels (forward, and backward in the training steps) in the loop.
A counter on the kernels' launchers proves they ran.
"""

from __future__ import annotations

import pytest

from attnfuse.kernels import flash
from tests.models import test_hf_models as hf


@pytest.fixture
def launches(monkeypatch):
    counts = {"forward": 0, "backward": 0}
    for name in counts:
        real = getattr(flash, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(flash, name, counted)
    return counts


@pytest.mark.parametrize("test", [hf.test_gpt2_inductor, hf.test_llama_gqa_inductor, hf.test_llama_left_padding],
                         ids=lambda t: t.__name__)
def test_forward(test, launches):
    test()
    assert launches["forward"] >= 2  # two layers, at least once each


@pytest.mark.parametrize("test", [hf.test_gpt2_training_step, hf.test_llama_training_step], ids=lambda t: t.__name__)
def test_training_step(test, launches):
    test()
    assert launches["forward"] >= 2 and launches["backward"] >= 2
