"""Attention re-ranking (ICR): scores against a naive loop, a planted document, sparse readings restricted to
the method's support, bad input, the rerank task's builder and nDCG, and the eval grid's rows (the command
line: tests/test_cli.py -k rerank)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from attnsieve.integrations.hf import patched
from attnsieve.kernels import support_attention
from attnsieve.methods import LayerContext, SparseMethod, make, names
from attnsieve.signals.rerank import icr_prompt, ndcg_at_k, rerank, row_probabilities, support_row_mask

from helpers import assert_close
from tiny_models import tiny_tokenizer

DOCS = ["the cat sat on the mat all day long", "python is a programming language", "dogs bark loudly at night",
        "rain falls on the green hills in spring"]
QUERY = "which one is about programming?"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_gemma(tok, window: int = 24):
    """Gemma-3 layout (sliding and global layers, 4 query heads on 1 KV head) over the byte tokenizer."""
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=1024, attn_implementation="sdpa", pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg).eval()


def tiny_llama(tok, layers: int = 2, context: int = 1024):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=context,
                      attn_implementation="sdpa", pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def naive_scores(model, tok, query, docs, layers):
    """ICR by hand: the whole prompt in one exact forward, q/k captured, attention of the query rows computed
    from them with explicit causal (and window) masks, per layer and head; the calibration prompt likewise;
    mean over query rows, summed over the layers' heads, per-document masked calibration."""
    prompt = icr_prompt(tok, query, docs)
    per_tail = []
    for tail in (prompt.tail, prompt.calibration_tail):
        ids = torch.tensor([prompt.prefix + tail])
        with patched(model, "dense") as p, p.capturing() as cap, torch.no_grad():
            model(ids)
        T = ids.shape[1]
        first = len(prompt.prefix) + prompt.query_start
        total = torch.zeros(T, dtype=torch.float64)
        for li in layers:
            c = cap[li]
            q, k = c.q[0].double(), c.k[0].double()  # [H, T, D], [Hkv, T, D]
            H, Hkv = q.shape[0], k.shape[0]
            for h in range(H):
                for r in range(first, T):
                    s = (k[h // (H // Hkv)] @ q[h, r]) * c.ctx.scale  # [T]
                    ok = torch.arange(T) <= r
                    if c.ctx.window is not None:
                        ok &= r - torch.arange(T) < c.ctx.window
                    total += torch.softmax(s.masked_fill(~ok, -math.inf), -1) / (T - first)
        per_tail.append(total)
    scores = []
    for lo, hi in prompt.spans:
        d = per_tail[0][lo:hi] - per_tail[1][lo:hi]
        keep = d > d.mean() - 2 * d.std()
        scores.append(float((d * keep).sum()))
    return scores


@pytest.mark.parametrize("layers", ["all", "auto", "sliding"])
def test_scores_equal_a_naive_loop_gemma_layout(tok, layers):
    model = tiny_gemma(tok)
    r = rerank(model, tok, QUERY, DOCS, layers=layers)
    read = {"all": [0, 1, 2, 3], "auto": [1, 3], "sliding": [0, 2]}[layers]
    assert sorted({li for li, _ in r.details.selected}) == read
    expected = naive_scores(model, tok, QUERY, DOCS, read)
    got = torch.tensor(r.details.scores, dtype=torch.float64)
    assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-4)
    assert [i for i, _ in r] == sorted(range(len(DOCS)), key=lambda i: -expected[i])
    assert r.details.prompt_tokens > 24  # the prompt is longer than the window: sliding layers see part of it


def test_scores_equal_a_naive_loop_grouped_query(tok):
    model = tiny_llama(tok)
    r = rerank(model, tok, QUERY, DOCS)
    assert_close(torch.tensor(r.details.scores, dtype=torch.float64),
                 torch.tensor(naive_scores(model, tok, QUERY, DOCS, [0, 1]), dtype=torch.float64), atol=1e-5, rtol=1e-4)


def test_explicit_heads_and_rescore_agree(tok):
    model = tiny_gemma(tok)
    full = rerank(model, tok, QUERY, DOCS, layers="all")
    pairs = {(1, 2), (3, 0)}
    some = rerank(model, tok, QUERY, DOCS, heads=pairs)
    assert some.details.selected == sorted(pairs)
    assert_close(torch.tensor(some.details.scores), torch.tensor(full.details.rescore(pairs)))


def test_retrieval_heads_come_from_the_profiles(tok):
    model = tiny_gemma(tok)
    profiles = {"layers": [{"layer": li, "sliding": li % 2 == 0, "retrieval": [0.0, 0.1 * li, 0.0, 0.9 if li == 3
                            else 0.0]} for li in range(4)]}
    r = rerank(model, tok, QUERY, DOCS, heads="retrieval", profiles=profiles, head_fraction=0.25)
    assert r.details.selected == [(3, 1), (3, 3)]  # 2 of the 8 global (layer, head) pairs, best retrieval scores
    full = rerank(model, tok, QUERY, DOCS, layers="all")
    assert_close(torch.tensor(r.details.scores), torch.tensor(full.details.rescore(r.details.selected)))


MARK, NEEDLE = "@", "#"  # the planted head: query rows of "@" attend to "#" tokens, wherever they are


def planted_llama(tok):
    """A random tiny Llama whose layer-1 head 0 makes every "@" query attend to the "#" tokens: residual
    coordinate 0 is 1 only on "#" embeddings and coordinate 1 only on "@" embeddings, no layer writes either
    coordinate, the head's key reads coordinate 0 and its query coordinate 1 (in the slowest rotary pair)."""
    model = tiny_llama(tok, layers=2)
    slow = 7  # head_dim 96 / 6 = 16: the pair (7, 15) turns slowest
    needle, mark = tok.convert_tokens_to_ids(NEEDLE), tok.convert_tokens_to_ids(MARK)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, :2] = 0
        emb[needle, 0] = 4.0
        emb[mark, 1] = 4.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:2] = 0
            layer.mlp.down_proj.weight[:2] = 0
        attn = model.model.layers[1].self_attn
        attn.k_proj.weight[slow] = 0
        attn.k_proj.weight[slow, 0] = 20.0
        attn.q_proj.weight[slow] = 0
        attn.q_proj.weight[slow, 1] = 20.0
    return model


def test_planted_document_ranks_first_in_every_order(tok):
    assert NEEDLE not in "".join(DOCS) + QUERY and MARK not in "".join(DOCS) + QUERY
    model = planted_llama(tok)
    docs = [*DOCS[:3], f"this one holds the {NEEDLE} sign"]
    query = f"find the sign {MARK * 40}"  # enough "@" rows that their mass shows through the mean over query rows
    for perm in itertools.permutations(range(4)):
        r = rerank(model, tok, query, [docs[i] for i in perm])
        assert perm[r[0][0]] == 3, (perm, list(r))
        head = rerank(model, tok, query, [docs[i] for i in perm], heads={(1, 0)})  # the planted head alone
        assert perm[head[0][0]] == 3 and head[0][1] > 4 * abs(head[1][1]), (perm, list(head))


def test_order_of_the_other_documents_barely_moves_the_planted_score(tok):
    model = planted_llama(tok)
    docs = [*DOCS[:3], f"this one holds the {NEEDLE} sign"]
    scores = [dict(rerank(model, tok, f"find the sign {MARK * 40}", {**{i: docs[i] for i in perm}, 3: docs[3]},
                          heads={(1, 0)}))[3]
              for perm in itertools.permutations(range(3))]  # the planted document stays last
    assert max(scores) - min(scores) < 0.05 * max(scores)


SPARSE = [n for n in names() if isinstance(make(n), SparseMethod)]


@pytest.mark.parametrize("name", SPARSE)
def test_sparse_reading_is_the_methods_own_attention(name):
    """The read probabilities, times v, give the method's own output for those rows, and vanish off its support."""
    torch.manual_seed(1)
    H, Hkv, T, D = 4, 2, 200, 16
    q, k, v = torch.randn(1, H, T, D), torch.randn(1, Hkv, T, D), torch.randn(1, Hkv, T, D)
    ctx = LayerContext(0, D**-0.5)
    params = {"density": 0.2} if "density" in {f for f in make(name).params.__dataclass_fields__} else {}
    if "block_size" in make(name).params.__dataclass_fields__:
        params["block_size"] = 16
    m = make(name, **params)
    support = m.support(q, k, ctx)
    want = support_attention(q, k, v, support, causal=True, scale=ctx.scale).out[0]  # [H, T, D]
    rows = [0, 17, 150, T - 1]
    p = row_probabilities(q, k, ctx, rows, support)  # [H, R, T]
    got = torch.einsum("hrt,htd->hrd", p, v[0].repeat_interleave(H // Hkv, 0))
    assert_close(got, want[:, rows], atol=1e-4, rtol=1e-4, what=name)
    off = ~support_row_mask(support, rows, H, T, T)
    assert float(p[off].abs().sum()) == 0.0


@pytest.mark.parametrize("name", ["block-topk", "flexprefill"])
def test_density_one_reads_dense_attention(tok, name):
    model = tiny_gemma(tok)
    dense = rerank(model, tok, QUERY, DOCS)
    full = rerank(model, tok, QUERY, DOCS, method=name, density=1.0, block_size=16)
    assert full.details.density == pytest.approx(1.0)
    assert_close(torch.tensor(full.details.scores), torch.tensor(dense.details.scores), atol=1e-5, rtol=1e-4)


def test_a_sparse_method_changes_the_reading_and_says_so(tok):
    model = tiny_gemma(tok)
    dense = rerank(model, tok, QUERY, DOCS)
    sparse = rerank(model, tok, QUERY, DOCS, method="block-topk", density=0.2, block_size=16)
    assert sparse.details.method == "block-topk" and sparse.details.density < 0.6
    assert sparse.details.scores != pytest.approx(dense.details.scores)


@pytest.mark.parametrize("method", ["linear", "window", "scatterbrain"])
def test_methods_without_a_support_are_refused(tok, method):
    with pytest.raises(ValueError, match="reads sparse or exact attention"):
        rerank(tiny_gemma(tok), tok, QUERY, DOCS, method=method)


@pytest.mark.parametrize("kw,needle", [
    ({"query": ""}, "query must be a non-empty"), ({"query": "   "}, "query must be a non-empty"),
    ({"documents": []}, "no documents"), ({"documents": {}}, "no documents"),
    ({"documents": ["fine", ""]}, "document 1"), ({"documents": "just one string"}, "list of strings"),
    ({"documents": ["x" * 600, "y" * 600]}, "beyond the model's context"),
    ({"layers": "middle"}, "'middle'"), ({"layers": [0, 9]}, r"\[0, 9\]"),
    ({"heads": "best"}, "'best'"), ({"heads": {(0, 7)}}, r"\(0, 7\)"), ({"heads": set()}, "empty"),
    ({"head_fraction": 0}, "head_fraction"), ({"method": "nope"}, "nope"),
    ({"method": "dense", "density": 0.1}, "without a method"),
])
def test_bad_input_is_a_value_error_naming_it(tok, kw, needle):
    model = tiny_gemma(tok)
    model.config.max_position_embeddings = 1024
    args = {"query": QUERY, "documents": DOCS, **kw}
    with pytest.raises(ValueError, match=needle):
        rerank(model, tok, args.pop("query"), args.pop("documents"), **args)


def test_layers_sliding_on_a_model_without_sliding_layers(tok):
    with pytest.raises(ValueError, match="no such layers"):
        rerank(tiny_llama(tok), tok, QUERY, DOCS, layers="sliding")


def test_ndcg_against_hand_computed_values():
    assert ndcg_at_k([0, 1, 2], [0]) == 1.0
    assert ndcg_at_k([2, 0, 1], [0]) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k([2, 3, 0], [0]) == pytest.approx(0.5)
    assert ndcg_at_k([2, 0, 1], [0, 1]) == pytest.approx((1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(list(range(1, 12)) + [0], [0]) == 0.0  # rank 12: outside the top 10
    assert ndcg_at_k([1, 0], [0], k=1) == 0.0
    with pytest.raises(ValueError):
        ndcg_at_k([0], [])


# ---- the rerank task ----

def test_task_is_deterministic_with_one_relevant_passage_that_fits(tok):
    from attnsieve.eval.tasks.rerank import make_rerank, sections

    pool = {s[3][:200]: s for s in sections()}
    for length, depth, seed in [(2048, 0.0, 0), (2048, 0.55, 3), (1024, 1.0, 7)]:
        a, b = make_rerank(tok, length, depth, seed), make_rerank(tok, length, depth, seed)
        assert torch.equal(a.input_ids, b.input_ids) and a.meta == b.meta
        m = a.meta
        assert len(m["passages"]) == 10 and m["relevant"] == round(depth * 9)
        assert a.input_ids.shape[1] == a.length <= length and a.length > 0.9 * length  # packed to the budget
        topics = [t for t, _ in m["sources"]]
        rel_topic = topics[m["relevant"]]
        assert topics.count(rel_topic) == 1 and len({h for _, h in m["sources"]}) == 10
        assert all(m["query"] not in p for p in m["passages"])
        full = next(s for s in sections() if s[1] == m["sources"][m["relevant"]][1])
        assert m["query"] == full[2] and full[3].startswith(m["passages"][m["relevant"]][:50])
        assert pool  # sections are parsed
    assert make_rerank(tok, 2048, 0.5, 1).meta["query"] != make_rerank(tok, 2048, 0.5, 2).meta["query"]


def test_task_refuses_a_length_too_short(tok):
    from attnsieve.eval.tasks.rerank import make_rerank

    with pytest.raises(ValueError, match="too short"):
        make_rerank(tok, 200, 0.5, 0)


def test_bm25_and_random_baselines():
    pytest.importorskip("bm25s", reason="the rerank extra is not installed")
    from attnsieve.eval.tasks.rerank import bm25_scores, random_order, ranked

    s = bm25_scores("python programming language", DOCS)
    assert ranked(s)[0] == 1 and s[0] == 0.0
    assert sorted(random_order(10, 3)) == list(range(10)) and random_order(10, 3) == random_order(10, 3)


def test_eval_grid_rows_and_report(tmp_path, tok):
    pytest.importorskip("bm25s", reason="the rerank extra is not installed")
    from attnsieve.eval.runner import EvalSpec, run_grid

    model = tiny_gemma(tok)
    spec = EvalSpec(model="tiny", methods=["dense", "block-topk"], tasks=["rerank"], lengths=[1024], samples=2,
                    out=tmp_path, densities=[0.3], sets={"block-topk": {"block_size": 16}}, command="test")
    rows = run_grid(model, tok, spec)
    assert len(rows) == 4
    for r in rows:
        assert r["task"] == "rerank" and r["correct"] in (0.0, 1.0) and 0 < r["ndcg10"] <= 1
        assert r["correct"] == float(r["ranking"][0] == r["relevant"])
        assert r["ndcg10"] == pytest.approx(1 / math.log2(r["ranking"].index(r["relevant"]) + 2))
        for key in ("bm25_correct", "bm25_ndcg10", "random_correct", "random_ndcg10", "versions", "threads"):
            assert r[key] is not None, key
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(r["density"] == 1.0 for r in dense)
    assert all(r["density"] < 0.8 for r in rows if r["method"] == "block-topk")
    report = (tmp_path / "report.md").read_text()
    assert "Re-ranking: rerank" in report and "BM25 nDCG@10" in report


def test_eval_refuses_a_method_without_support_for_rerank(tmp_path):
    from attnsieve.eval.runner import EvalSpec

    with pytest.raises(ValueError, match="reads sparse or exact attention"):
        EvalSpec(model="tiny", methods=["dense", "window"], tasks=["rerank"], lengths=[1024], samples=1,
                 out=tmp_path)
