"""The host-sync counter (kernels/host_syncs.py) and the sparse methods' supports under it."""

import torch

from attnsieve.kernels.host_syncs import count_host_syncs


def test_counter_sees_reads_of_device_tensors_only():
    q = torch.randn(4, 8)
    with count_host_syncs(q) as s:
        d = q.abs().sum(-1)  # derived from a device tensor: on the device
        d.max().item()
        int(d.argmax())
        d.tolist()
        host = torch.arange(5)  # no device: host-side planning
        host.max().item()
        int(host.sum())
        made = torch.arange(5, device=q.device)  # explicit device: on the device
        bool(made.any())
    assert s.count == 4
    ops = sorted(op for op, _ in s.sites)
    assert ops == ["__bool__", "__int__", "item", "tolist"]
    assert all(site.startswith("outside") for _, site in s.sites)  # the test file is not attnsieve's


def test_counter_data_dependent_shapes_and_copies():
    q = torch.randn(6, 3)
    with count_host_syncs(q) as s:
        q[q > 0]  # boolean indexing: the output size is data
        torch.nonzero(q > 0)
        q.repeat_interleave(torch.tensor([1, 2, 0, 1, 1, 1]), dim=0)
        q.repeat_interleave(2, dim=0)  # a Python int: no sync
        c = q.cpu()  # a copy to the host: one sync, then host
        c.sum().item()
        q[torch.arange(2)]  # integer indexing: no sync
        torch.where(q > 0, q, 0)  # three arguments: no sync
    assert s.count == 4, str(s)


def test_counter_unmarks_its_inputs():
    q = torch.randn(3)
    with count_host_syncs(q):
        pass
    with count_host_syncs() as s:
        q.sum().item()
    assert s.count == 0


# ---- every sparse method's support(): a bounded number of host syncs, whatever the length ----------

import pytest  # noqa: E402

from attnsieve.methods import LayerContext, SparseMethod, describe, make, method_class, names  # noqa: E402
from attnsieve.methods.block_topk import BlockTopK  # noqa: E402

SPARSE = [n for n in names() if issubclass(method_class(n), SparseMethod)]
DENSITY = [n for n in SPARSE if "density" in describe(n)["params"]]
# Most syncs one support() call may make on a GPU: sizes of the ragged outputs (the longest block
# list, a token list's width) and a few data-dependent shortcuts; never one per block or group.
MAX_SYNCS = 4
# Not yet within the bound (strict: a fix that passes must leave this list).
SYNC_HEAVY = {"anchor", "tokenselect"}
SYNC_HEAVY_AT_DENSITY = {"anchor", "tokenselect", "vertical-slash"}
LENGTHS = (1024, 8192)  # 8x: a sync per block or per group of blocks exceeds the bound


def support_syncs(name: str, T: int, **kw) -> int:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, T, 32, generator=g), torch.randn(1, 2, T, 32, generator=g)
    method = make(name, **kw)
    with count_host_syncs(q, k) as s:
        method.support(q, k, LayerContext(0, 32**-0.5))
    return s


@pytest.fixture(autouse=True)
def torch_planner(monkeypatch):
    """block-topk's compiled planner hides its work in C++ on the CPU; on a GPU the torch path runs."""
    monkeypatch.setattr(BlockTopK, "use_compiled", False)


def marked(names, heavy):
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="host syncs per block or group"))
            if n in heavy else n for n in names]


@pytest.mark.parametrize("name", marked(SPARSE, SYNC_HEAVY))
def test_support_syncs_bounded_at_defaults(name):
    counts = [support_syncs(name, T) for T in LENGTHS]
    assert all(c.count <= MAX_SYNCS for c in counts), f"{name}: {[str(c) for c in counts]}"


@pytest.mark.parametrize("name", marked(DENSITY, SYNC_HEAVY_AT_DENSITY))
def test_support_syncs_bounded_at_a_density(name):
    counts = [support_syncs(name, T, density=0.1) for T in LENGTHS]
    assert all(c.count <= MAX_SYNCS for c in counts), f"{name}: {[str(c) for c in counts]}"
