"""The tile is decided once: the Triton tile a compiled site launches is the one its report names
(`Site.config`), for every device preset and a calibrated spec, forward and backward, with and without a mask
tensor (whose element size the plan counts).  Runs the kernels under the interpreter (or on a GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnfuse
from attnfuse.device import PRESETS
from attnfuse.kernels.flash import launcher

# a calibrated spec with little shared memory: its plan differs from every preset's
SMALL = dataclasses.replace(PRESETS["a100"], name="calibrated-small", smem_per_block=99 * 2**10,
                            smem_per_sm=100 * 2**10)
DEVICES = ["h100", "h200", "a100", "cpu", SMALL]
KERNELS = {"fwd_kernel": "", "bwd_dkdv_kernel": "bwd_", "bwd_dq_kernel": "bwd_"}


class Biased(torch.nn.Module):
    def forward(self, q, k, v, bias):
        return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias).softmax(-1) @ v


class Causal(torch.nn.Module):
    def forward(self, q, k, v, bias):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _launched(monkeypatch) -> list[tuple[str, dict[str, int]]]:
    seen = []
    real = launcher.launch

    def recording(kernel):
        name = getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None), "__name__", ""))
        grid_fn = real(kernel)

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    if name in KERNELS:
                        seen.append((KERNELS[name], {k: kwargs[k] for k in
                                                     ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}))
                    return grid_fn[grid](*args, **kwargs)
                return run
        return _Grid()

    monkeypatch.setattr(launcher, "launch", recording)
    return seen


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d if isinstance(d, str) else d.name)
@pytest.mark.parametrize("model", [Biased, Causal], ids=lambda m: m.__name__)
def test_site_config_is_what_launches(monkeypatch, device, model):
    torch._dynamo.reset()
    seen = _launched(monkeypatch)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 37, 40, generator=g, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 37, 37, generator=g)
    # attnfuse's own kernels: on a GPU preset the model may pick PyTorch's (sdpa / flex), which launch no tile
    own = ["flash", "window", "blocksparse"]
    compiled = torch.compile(model(), backend="attnfuse", options={"device": device, "inner": "eager", "kernels": own})
    out = compiled(q, k, v, bias)
    out.sum().backward()
    site = attnfuse.last_report().sites[0]
    assert site.status == "fused" and site.kernel == "flash"
    launched = {f"{prefix}{key}": value for prefix, cfg in seen for key, value in cfg.items()}
    assert {prefix for prefix, _ in seen} == {"", "bwd_"}, seen
    assert launched == site.config, (launched, site.config)
    # every launch of a kind ran the same tile
    assert all(cfg == {k[len(p):]: v for k, v in site.config.items() if k.startswith(p) and
                       (p or not k.startswith("bwd_"))} for p, cfg in seen)
    want = model()(*(x.detach().double() for x in (q, k, v)), bias.double())
    assert torch.allclose(out.double(), want, atol=1e-4, rtol=1e-4)
