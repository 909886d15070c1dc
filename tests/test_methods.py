"""Every registered method, on raw tensors: degenerate settings, causality, measured density."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnsieve.kernels import dense_attention, exact_cells
from attnsieve.methods import LayerContext, describe, leak_free_params, make, method_class, names, parse_params
from attnsieve.methods.selection import block_layout, density_budget, forced_blocks, kth_smallest, topk_support

from helpers import assert_close, masked_dense_reference

ALL = names()
CAUSAL = [n for n in ALL if method_class(n).supports_causal_mask]


def qkv(B=1, H=4, Hkv=1, T=300, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


def small(name: str, **extra):
    """The method with blocks small enough that short test inputs span many of them."""
    params = dict(extra)
    if "block_size" in describe(name)["params"]:
        params.setdefault("block_size", 16)
    return make(name, **params)


def run(method, q, k, v, window=None, key_valid=None):
    ctx = LayerContext(0, q.shape[-1] ** -0.5, window, key_valid)
    return method.prefill(q, k, v, ctx)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("T", [1, 63, 300])
@pytest.mark.parametrize("window", [None, 40], ids=["global", "sliding40"])
@pytest.mark.parametrize("heads", [(4, 1), (4, 4)], ids=["GQA", "MHA"])
def test_degenerate_setting_equals_dense(name, T, window, heads):
    exact = method_class(name).exact_params
    if exact is None:
        pytest.skip(f"{name} has no degenerate setting; its error-vs-rank test covers it")
    q, k, v = qkv(H=heads[0], Hkv=heads[1], T=T)
    res = run(small(name, **exact), q, k, v, window=window)
    ref, _ = dense_attention(q, k, v, causal=True, window=window)
    assert_close(res.out, ref, what=name)
    assert res.cells == heads[0] * exact_cells(T, T, window=window)


@pytest.mark.parametrize("name", ALL)
def test_degenerate_setting_with_left_padding(name):
    exact = method_class(name).exact_params
    if exact is None:
        pytest.skip(f"{name} has no degenerate setting")
    q, k, v = qkv(B=2, T=130)
    valid = torch.ones(2, 130, dtype=torch.bool)
    valid[0, :37] = False
    res = run(small(name, **exact), q, k, v, key_valid=valid)
    ref, _ = dense_attention(q, k, v, causal=True, key_valid=valid)
    assert_close(res.out[0, :, 37:], ref[0, :, 37:])
    assert_close(res.out[1], ref[1])


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("density", [None, 0.2])
def test_no_causal_leak(name, density):
    """Changing queries, keys and values from position t on never changes an output before t.

    Every method runs in its causal form: as it is when its default is causal, with `causal=True`
    when its default looks ahead as its paper does (those are tested in test_lookahead_*).
    """
    params = {"density": density} if density is not None and "density" in describe(name)["params"] else {}
    params.update(leak_free_params(name))
    if name == "window":
        params.setdefault("window", 50)
    method = small(name, **params)
    q, k, v = qkv(T=400, seed=1)
    base = run(method, q, k, v).out
    for t in (1, 17, 150, 399):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        g = torch.Generator().manual_seed(t)
        q2[:, :, t:] = torch.randn(q2[:, :, t:].shape, generator=g) * 3
        k2[:, :, t:] = torch.randn(k2[:, :, t:].shape, generator=g) * 3
        v2[:, :, t:] = torch.randn(v2[:, :, t:].shape, generator=g)
        out = run(method, q2, k2, v2).out
        # Equal up to float summation order (a query's union of blocks may differ in width);
        # a leaked selection changes outputs by orders of magnitude more.
        assert_close(out[:, :, :t], base[:, :, :t], what=f"{name}: output before {t}")


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3])
def test_block_topk_measured_density_lands_near_target(density):
    q, k, v = qkv(T=4096, D=64, seed=2)
    # Neighbouring queries of a real model are correlated; fully independent random queries
    # would make every query of a block choose different blocks.
    q = q[:, :, :1] + 0.3 * q
    res = run(make("block-topk", density=density, block_size=32), q, k, v)
    measured = res.cells / (4 * exact_cells(4096, 4096))
    # the sink and diagonal blocks are a floor (about 0.02 here) and counts are whole blocks
    assert 0.7 * density <= measured <= 1.2 * density + 0.02, measured


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5])
def test_window_density_sizes_the_window(density):
    q, k, v = qkv(T=1000, seed=3)
    res = run(make("window", density=density, sink=4), q, k, v)
    measured = res.cells / (4 * exact_cells(1000, 1000))
    assert density - 0.01 <= measured <= density + 1e-9


def test_window_equals_masked_dense_sink_plus_local():
    q, k, v = qkv(T=200, seed=4)
    res = run(make("window", sink=3, window=20, block_size=16), q, k, v)
    pos = torch.arange(200)
    allowed = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] < 20) | (pos[None, :] < 3))
    ref, _ = dense_attention(q, k, v, causal=True, mask=allowed[None, None])
    assert_close(res.out, ref)
    assert res.cells == 4 * int(allowed.sum())


def test_window_sinks_follow_left_padding():
    """With left padding the sinks are the first real tokens, so each row equals its unpadded run."""
    q, k, v = qkv(B=1, T=150, seed=5)
    method = make("window", sink=4, window=30, block_size=16)
    alone = run(method, q[:, :, 20:], k[:, :, 20:], v[:, :, 20:]).out
    valid = torch.ones(1, 150, dtype=torch.bool)
    valid[0, :20] = False
    padded = run(method, q, k, v, key_valid=valid).out
    assert_close(padded[:, :, 20:], alone)


def test_block_topk_finds_a_planted_block():
    """A key block aligned with the late queries is selected, so the output matches dense closely."""
    q, k, v = qkv(T=1024, D=64, seed=6)
    q = q[:, :, :1] + 0.3 * q  # neighbouring queries are correlated, as in real models
    # One key block strongly aligned with the last queries (strong enough to beat the slack of
    # Quest's min/max bound on random 64-dimensional keys, which real keys do not have).
    k[:, :, 304:320] = q[:, :, -1:].mean(1, keepdim=True) * 10
    res = run(make("block-topk", density=0.1, block_size=16), q, k, v)
    ref, _ = dense_attention(q, k, v)
    err = (res.out[:, :, -1] - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert err < 0.05, float(err)


def test_topk_support_keeps_forced_and_best_blocks():
    layout = block_layout(64, 64, 16, None, None, 1, "cpu")
    forced = forced_blocks(layout, 1, 1)
    scores = torch.tensor([0.0, 5.0, 1.0, 9.0]).expand(1, 1, 4, 4)
    keep = density_budget(0.75, layout.n_avail, forced.sum(-1))
    sup = topk_support(scores, layout.allowed, forced, keep, 16)
    mask = sup.to_mask(4)[0, 0]
    assert mask[3].tolist() == [True, True, False, True]  # sink, best (block 1), diagonal
    assert mask[0].tolist() == [True, False, False, False]


@pytest.mark.parametrize("values", ["normal", "ties", "signs_zeros_infs"])
def test_kth_smallest_equals_kthvalue(values):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1000, generator=g) * torch.tensor([[1e-3], [1.0], [1e4]])
    if values == "ties":
        x = x.round()
    if values == "signs_zeros_infs":
        x[:, ::7] = float("inf")
        x[:, 1::9] = float("-inf")
        x[:, 2::11] = 0.0
        x[:, 3::13] = -0.0
    for k in ([1, 1, 1], [1000, 1000, 1000], [17, 500, 999], [143, 144, 145]):
        want = torch.stack([x[b].kthvalue(k[b]).values for b in range(3)])
        assert torch.equal(kth_smallest(x, torch.tensor(k)), want), k


@pytest.mark.parametrize("name", ALL)
def test_describe_lists_every_parameter_with_help(name):
    d = describe(name)
    assert {"name", "family", "phases", "params"} <= d.keys()
    fields = {f.name for f in dataclasses.fields(method_class(name).Params)}
    assert set(d["params"]) == fields
    assert all(d["param_help"][f] for f in fields), "every parameter documents its meaning"


@pytest.mark.parametrize(
    "name,key,value",
    [("window", "window", "0"), ("window", "density", "1.5"), ("block-topk", "density", "0"),
     ("block-topk", "block_size", "8"), ("block-topk", "summary", "median"), ("window", "sink", "-1")],
)
def test_bad_parameters_raise_value_error_naming_the_value(name, key, value):
    with pytest.raises(ValueError, match=key):
        make(name, **parse_params(name, {key: value}))


def test_parse_params_converts_types():
    assert parse_params("block-topk", {"density": "0.25", "per_head": "false", "block_size": "32"}) == {
        "density": 0.25, "per_head": False, "block_size": 32}
    assert parse_params("window", {"density": "none"}) == {"density": None}
    with pytest.raises(ValueError, match="unknown parameter"):
        parse_params("dense", {"window": "3"})
    with pytest.raises(ValueError, match="unknown method"):
        make("nope")


@pytest.mark.parametrize("name", ALL)
def test_integer_key_valid_is_read_as_bool_by_every_method(name):
    """transformers' attention masks are int64: every method gets them converted once, the same way."""
    q, k, v = qkv(B=2, T=130)
    valid = torch.ones(2, 130, dtype=torch.bool)
    valid[0, :37] = False
    results = []
    for mask in (valid, valid.long(), valid.int()):
        torch.manual_seed(0)  # methods with random projections draw the same ones
        try:
            results.append(run(small(name), q, k, v, key_valid=mask))
        except ValueError as e:  # a method that refuses this layer refuses it for every mask dtype
            results.append(type(e))
    if isinstance(results[0], type):
        assert results == [results[0]] * 3
        return
    for res in results[1:]:
        assert torch.equal(res.out, results[0].out) and res.cells == results[0].cells


@pytest.mark.parametrize("bad", [torch.ones(2, 5), torch.full((2, 5), 2), torch.ones(5, dtype=torch.bool), [[1, 0]]],
                         ids=["float", "int-not-0-1", "1d", "list"])
def test_key_valid_that_is_not_a_mask_is_a_type_error(bad):
    with pytest.raises(TypeError, match="key_valid must be"):
        LayerContext(0, 1.0, None, bad)


LOOKAHEAD = [n for n in ALL if describe(n)["lookahead"]]
# look-ahead methods that choose a support (act looks ahead for its sink statistics: tests/test_method_act.py)
LOOKAHEAD_SUPPORT = [n for n in LOOKAHEAD if hasattr(method_class(n), "support")]


def support_token_mask(support, H, T):
    """[B, H, T, T] bool: the key blocks (per row where a row_mask restricts them) and listed key tokens a
    support puts in scope, causal (loops)."""
    bs = support.block_size
    B, Hs = support.blocks.shape[:2]
    G = H // Hs
    mask = torch.zeros(B, H, T, T, dtype=torch.bool)
    for b, hs, j, slot in torch.nonzero(support.blocks >= 0).tolist():
        kb = int(support.blocks[b, hs, j, slot])
        for g in range(G):
            rows = torch.ones(bs, dtype=torch.bool) if support.row_mask is None else (
                support.row_mask[b, hs, j, g * bs : (g + 1) * bs, slot])
            r = j * bs + torch.nonzero(rows).flatten()
            mask[b, hs * G + g, r[r < T], kb * bs : (kb + 1) * bs] = True
    if support.tokens is not None:
        Ht = support.tokens.shape[1]
        for b, ht, j, m in torch.nonzero(support.tokens >= 0).tolist():
            for h in range(ht * H // Ht, (ht + 1) * H // Ht):
                mask[b, h, j * bs : (j + 1) * bs, int(support.tokens[b, ht, j, m])] = True
    return mask & torch.ones(T, T, dtype=torch.bool).tril()


def test_registry_declares_the_look_ahead_defaults():
    assert {"vertical-slash", "block-sparse", "flexprefill"} <= set(LOOKAHEAD)
    for name in ALL:
        d = describe(name)
        assert isinstance(d["lookahead"], bool)
        assert d["lookahead"] == ("causal" in d["params"] and d["params"]["causal"] is False), name
        assert leak_free_params(name) == ({"causal": True} if d["lookahead"] else {})


@pytest.mark.parametrize("name", LOOKAHEAD_SUPPORT)
def test_lookahead_default_depends_on_the_last_query_block_only_as_the_paper_does(name):
    """Changing only the last query block's queries changes the chosen support (the paper estimates from
    the prompt's last queries or a block's own), the leak-free form's support before that block does not
    change, and both still compute exact attention over the support they chose."""
    T, bs = 320, 16
    q, k, v = qkv(T=T, D=32, seed=21)
    params = {"density": 0.2} if "density" in describe(name)["params"] else {}
    # forced parts small enough that the density budget leaves room for a choice on 320 tokens; seer's
    # last two query blocks are dense by default (the paper's last_block_dense), so nothing there to steer
    params.update({"vertical-slash": dict(sink_columns=2, local_diagonals=4),
                   "seer": dict(last_block_dense=False),
                   "dhsa": dict(global_tokens=16, local_tokens=16),
                   "sale": dict(query_block=16, segment=16, local_window=16)}.get(name, {}))
    ctx = LayerContext(0, 32**-0.5)
    q2 = q.clone()
    g = torch.Generator().manual_seed(22)
    q2[:, :, -bs:] = 4 * k[:, :, torch.randint(0, T - bs, (bs,), generator=g)].mean(1, keepdim=True)
    for causal in (False, True):
        method = small(name, causal=causal, **params)
        supports = [method.support(x, k, ctx) for x in (q, q2)]
        masks = [support_token_mask(s, 4, T) for s in supports]
        if causal:
            assert torch.equal(masks[0][:, :, : T - bs], masks[1][:, :, : T - bs]), name
        else:
            assert not torch.equal(masks[0], masks[1]), f"{name}: the last queries do not steer the support"
        for x, mask in zip((q, q2), masks, strict=True):
            ref, _ = masked_dense_reference(x, k, v, mask, scale=32**-0.5)
            assert_close(method.prefill(x, k, v, ctx).out, ref, what=f"{name} causal={causal}")


@pytest.mark.parametrize("per_head", [True, False])
def test_block_topk_token_budget_is_key_tokens_per_query(per_head):
    """Quest's meaning: token_budget = 256 with blocks of 32 gives every query 8 key blocks of its own
    (sink and diagonal included), or all it can see when fewer; the union a block computes is larger."""
    T, bs = 640, 32
    q, k, v = qkv(T=T, D=32, seed=9)
    method = make("block-topk", token_budget=256, block_size=bs, per_head=per_head)
    support = method.support(q, k, LayerContext(0, 32**-0.5))
    n_k = T // bs
    blocks = torch.where(support.blocks >= 0, support.blocks, n_k)
    own = torch.zeros(*support.row_mask.shape[:4], n_k + 1, dtype=torch.bool)
    own.scatter_(4, blocks[:, :, :, None, :].expand_as(support.row_mask),
                 support.row_mask & (support.blocks >= 0)[:, :, :, None, :])
    per_query = own[..., :n_k].sum(-1)  # [B, Hs, NQ, R]
    for j in range(n_k):
        assert (per_query[:, :, j] == min(8, j + 1)).all(), (j, per_query[:, :, j].unique())
    union = (support.blocks >= 0).sum(-1)
    assert (union[:, :, 10:] > 8).any(), "the union of a block's queries is larger than one query's choice"
    res = method.prefill(q, k, v, LayerContext(0, 32**-0.5))
    assert res.cells > 8 * bs * T * q.shape[1] * 0.5  # measured density counts the union
