"""The ``context_parallel`` option (`attnfuse.parallel.from_option`): a ProcessGroup, a 1-D DeviceMesh, the dict
form, and every bad value (a ValueError naming attnfuse, the option and what it accepts); the layouts' positions,
shard / unshard round trips; `encode` / `decode`."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed as dist

import attnfuse.parallel as par
from tests.parallel._dist import run


def _options(rank: int, ranks: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.group.WORLD
    cp = par.from_option(world)
    assert cp == par.ContextParallel(world.group_name, ranks, "auto", "contiguous")
    assert cp.rank() == rank and cp.group().size() == ranks
    mesh = init_device_mesh("cpu", (ranks,), mesh_dim_names=("cp",))
    from_mesh = par.from_option(mesh)
    assert from_mesh.ranks == ranks and from_mesh.rank() == rank
    assert par.from_option({"group": mesh, "strategy": "ring", "layout": "zigzag"}) == par.ContextParallel(
        from_mesh.group_name, ranks, "ring", "zigzag")
    assert par.from_option({"group": world, "strategy": "ulysses"}).strategy == "ulysses"
    assert par.decode(par.encode(cp)) == cp and pickle.loads(pickle.dumps(cp)) == cp
    # the group name is what the functional collectives take
    x = torch.full((2,), float(rank + 1))
    total = torch.distributed._functional_collectives.all_reduce(x, "sum", cp.group_name)
    assert torch.equal(total, torch.full((2,), float(ranks * (ranks + 1) // 2)))

    mesh2 = init_device_mesh("cpu", (ranks, 1), mesh_dim_names=("a", "b"))
    with pytest.raises(ValueError, match=r"attnfuse option 'context_parallel'.*1-D DeviceMesh.*2 dims"):
        par.from_option(mesh2)
    assert par.from_option(mesh2["a"]).ranks == ranks
    with pytest.raises(ValueError, match=r"'context_parallel\.layout'.*'contiguous' \| 'zigzag'"):
        par.from_option({"group": world, "layout": "striped"})


def test_from_option_on_groups_and_meshes():
    run(_options, 2, timeout=600)


@pytest.mark.parametrize("value, where, allowed", [
    ("nccl", "'context_parallel'", "ProcessGroup, a 1-D DeviceMesh"),
    (2, "'context_parallel'", "ProcessGroup, a 1-D DeviceMesh"),
    ({"strategy": "ring"}, "'context_parallel'", "a dict with a 'group' key"),
    ({"group": None, "ranks": 2}, "'context_parallel.ranks'", "group, strategy, layout"),
    ({"group": None, "strategy": "tree"}, "'context_parallel.strategy'", "'auto' | 'ulysses' | 'ring'"),
    ({"group": None, "layout": "striped"}, "'context_parallel.layout'", "'contiguous' | 'zigzag'"),
    ({"group": "world"}, "'context_parallel'", "ProcessGroup, a 1-D DeviceMesh"),
])
def test_bad_options_name_attnfuse_the_option_and_the_allowed_values(value, where, allowed):
    with pytest.raises(ValueError) as info:
        par.from_option(value)
    message = str(info.value)
    assert message.startswith(f"attnfuse option {where}") and allowed in message, message


def test_no_option():
    assert par.from_option(None) is None and par.from_option(False) is None


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("layout", par.LAYOUTS)
def test_positions_shard_unshard_round_trip(ranks, layout):
    cp = par.ContextParallel("unused", ranks, layout=layout)
    length = 8 * ranks + (0 if layout == "zigzag" else ranks)  # contiguous: an odd local length too
    local = length // ranks
    everything = torch.cat([par.positions(cp, r, local) for r in range(ranks)])
    assert torch.equal(everything.sort().values, torch.arange(length)), "every position exactly once"
    x = torch.randn(3, length, 5)
    chunks = [par.shard(x, 1, cp, rank=r) for r in range(ranks)]
    for r, chunk in enumerate(chunks):
        assert torch.equal(chunk, x[:, par.positions(cp, r, local)])
    assert torch.equal(par.unshard(chunks, 1, cp), x)
    if layout == "contiguous":
        assert torch.equal(par.positions(cp, 1, local), torch.arange(local, 2 * local))
    else:  # rank r: chunk r and chunk 2P - 1 - r of 2P; causal work is balanced
        half = local // 2
        assert torch.equal(par.positions(cp, 0, local)[half:], torch.arange(length - half, length))
        work = [int((par.positions(cp, r, local) + 1).sum()) for r in range(ranks)]
        assert len(set(work)) == 1, work


def test_zigzag_needs_even_local_length():
    cp = par.ContextParallel("unused", 2, layout="zigzag")
    with pytest.raises(ValueError, match="attnfuse context_parallel.*zigzag.*even.*got 5"):
        par.positions(cp, 0, 5)
    with pytest.raises(ValueError, match="attnfuse context_parallel.*multiple of 4"):
        par.shard(torch.randn(1, 10), 1, cp, rank=0)
    with pytest.raises(ValueError, match="attnfuse context_parallel.*multiple of 3"):
        par.shard(torch.randn(1, 10), 1, par.ContextParallel("unused", 3), rank=0)


def test_encode_decode_round_trip():
    for cp in (par.ContextParallel("7", 2), par.ContextParallel("group:a", 4, "ring", "zigzag")):
        text = par.encode(cp)
        assert isinstance(text, str) and par.decode(text) == cp and par.decode(text) is par.decode(text)
    with pytest.raises(ValueError, match="attnfuse context_parallel"):
        par.decode(par.encode(par.ContextParallel("x", 2, "tree")))
