"""patch() on tiny random-init Llama and Gemma-3 models: exactness, generation, padding, refusals."""

from __future__ import annotations

import pytest
import torch

import attnsieve
from attnsieve.methods import describe, leak_free_params, method_class, names

from helpers import assert_close
from tiny_models import MODELS, VOCAB, tiny_gemma3, tiny_llama

SMALL_BLOCKS = {n: ({"block_size": 16} if "block_size" in describe(n)["params"] else {}) for n in names()}


def ids(T, B=1, seed=0):
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("T", [1, 63, 200])
def test_dense_patch_equals_stock_sdpa(arch, T):
    model = MODELS[arch]()
    x = ids(T)
    ref = logits(model, x)
    with attnsieve.patched(model, "dense") as p:
        out = logits(model, x)
    assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert p.stats.density() == 1.0
    if arch == "gemma3" and T > 24:  # sliding layers ran as true local attention, reported apart
        assert p.stats.local_density() == 1.0
        assert {r.method for r in p.stats.records if r.role == "local"} == {"exact"}
    assert model.config._attn_implementation == "sdpa"  # restored on exit


@pytest.mark.parametrize("name", [n for n in names() if method_class(n).exact_params is not None])
def test_degenerate_setting_equals_stock_in_model(name):
    model = tiny_gemma3()
    x = ids(150)
    ref = logits(model, x)
    with attnsieve.patched(model, name, **{**SMALL_BLOCKS[name], **method_class(name).exact_params}):
        out = logits(model, x)
    assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in names() if method_class(n).supports_causal_mask])
def test_no_causal_leak_in_model(name):
    """Changing a later token never changes an earlier position's logits (methods in their causal form)."""
    model = tiny_gemma3()
    params = {**SMALL_BLOCKS[name], **leak_free_params(name)}
    if "density" in describe(name)["params"]:
        params["density"] = 0.2
    x = ids(300)
    with attnsieve.patched(model, name, **params):
        base = logits(model, x)
        for t in (5, 140, 299):
            y = x.clone()
            y[0, t:] = (y[0, t:] + 7) % (VOCAB - 1) + 1
            assert_close(logits(model, y)[:, :t], base[:, :t], atol=1e-5, rtol=1e-5, what=f"{name} t={t}")


@pytest.mark.parametrize("arch", MODELS)
def test_prefill_then_cached_decode_equals_full_forward(arch):
    model = MODELS[arch]()
    x = ids(80)
    full = logits(model, x)
    with attnsieve.patched(model, "dense"), torch.no_grad():
        out = model(x[:, :70], use_cache=True)
        cache, steps = out.cache, [out.logits[:, -1]]
        for t in range(70, 80):
            out = model(x[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    assert_close(torch.stack(steps[:-1], 1), full[:, 69:79], atol=1e-4, rtol=1e-4)


DECODER_METHODS = [n for n in names() if method_class(n).supports_causal_mask]  # non-causal methods refuse decoders


@pytest.mark.parametrize("name", DECODER_METHODS)
def test_generate_works_patched(name):
    model = tiny_gemma3()
    x = ids(120)
    with torch.no_grad():
        ref = model.generate(x, max_new_tokens=6, do_sample=False)
        with attnsieve.patched(model, name, **SMALL_BLOCKS[name]) as p:
            out = model.generate(x, max_new_tokens=6, do_sample=False)
    assert out.shape == ref.shape
    phases = {r.phase for r in p.stats.records}
    assert phases == {"prefill", "decode"}
    assert p.stats.density("decode") == 1.0  # decoding steps are exact until KV policies land
    if name == "dense":
        assert torch.equal(out, ref)


def left_pad(rows: list[torch.Tensor]):
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, T - len(r) :] = r
        mask[i, T - len(r) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return x, mask, pos


@pytest.mark.parametrize("name", ["dense", "window"])
def test_left_padded_batch_rows_equal_batch_of_one(name):
    model = tiny_gemma3()
    a, b = ids(150, seed=1)[0], ids(90, seed=2)[0]
    x, mask, pos = left_pad([a, b])
    params = {**SMALL_BLOCKS[name], **({"window": 30, "sink": 4} if name == "window" else {})}
    with attnsieve.patched(model, name, **params):
        batch = logits(model, x, attention_mask=mask, position_ids=pos)
        one_a = logits(model, a[None])
        one_b = logits(model, b[None])
    assert_close(batch[0], one_a[0], atol=1e-4, rtol=1e-4)
    assert_close(batch[1, 60:], one_b[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in DECODER_METHODS if n not in ("dense", "window")])
def test_data_dependent_rows_are_independent_and_padding_unseen(name):
    model = tiny_gemma3()
    params = {**SMALL_BLOCKS[name], **({"density": 0.2} if "density" in describe(name)["params"] else {})}
    a, b, c = ids(150, seed=1)[0], ids(90, seed=2)[0], ids(90, seed=3)[0]
    with attnsieve.patched(model, name, **params):
        x, mask, pos = left_pad([a, b])
        base = logits(model, x, attention_mask=mask, position_ids=pos)
        x2, mask2, pos2 = left_pad([a, c])  # another second row
        other = logits(model, x2, attention_mask=mask2, position_ids=pos2)
        x3 = x.clone()
        x3[1, :60] = 5  # different padding token ids in row 1
        repadded = logits(model, x3, attention_mask=mask, position_ids=pos)
    assert_close(other[0], base[0], atol=1e-5, rtol=1e-5, what="row 0 depends on row 1")
    assert_close(repadded[1, 60:], base[1, 60:], atol=1e-5, rtol=1e-5, what="padding was attended")


def test_layer_override_keeps_chosen_layers_dense():
    model = tiny_gemma3()
    with attnsieve.patched(model, "block-topk", density=0.2, block_size=16, layers={1: "dense"}) as p:
        logits(model, ids(300))
    per_layer = p.stats.per_layer()
    assert per_layer[1] == 1.0 and per_layer[3] < 0.6
    assert p.stats.density() == per_layer[3]  # a layer kept dense by override is not averaged in
    assert p.layers == {0: "exact-local", 1: "dense", 2: "exact-local", 3: "block-topk"}


def test_method_on_a_sliding_layer_stays_inside_its_window():
    model = tiny_gemma3(sliding_window=24)
    x = ids(200)
    ref = logits(model, x)
    # a window wider than the layer's native window is cut to it, so the layer stays exact
    with attnsieve.patched(model, "dense", layers={0: attnsieve.methods.make("window", window=4096, block_size=16)}):
        out = logits(model, x)
    assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_patch_errors_are_clear():
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown method"):
        attnsieve.patch(model, "nope")
    with pytest.raises(ValueError, match="density"):
        attnsieve.patch(model, "block-topk", density=1.5)
    with pytest.raises(ValueError, match="layer index"):
        attnsieve.patch(model, "dense", layers={7: "dense"})
    with pytest.raises(ValueError, match="unknown KV-cache policy"):
        attnsieve.patch(model, "dense", kv="nope")
    with attnsieve.patched(model, "dense"):
        with pytest.raises(ValueError, match="already patched"):
            attnsieve.patch(model, "dense")
    with pytest.raises(ValueError, match="not patched"):
        attnsieve.unpatch(model)


@pytest.mark.parametrize(
    "call,error,needle",
    [
        (lambda m: attnsieve.patch(torch.nn.Linear(3, 3)), TypeError, "model must be a transformers PreTrainedModel"),
        (lambda m: attnsieve.patch("gemma3-270m"), TypeError, r"model must be .*attnsieve.load\('gemma3-270m'\)"),
        (lambda m: attnsieve.unpatch(torch.nn.Linear(3, 3)), TypeError, "model must be"),
        (lambda m: attnsieve.patch(m, 3), TypeError, "method must be"),
        (lambda m: attnsieve.patch(m, "block-topk", density="0.1"), TypeError, "parameter density must be a number"),
        (lambda m: attnsieve.patch(m, "block-topk", block_size=16.0), TypeError, "parameter block_size must be an int"),
        (lambda m: attnsieve.patch(m, "dense", kv="snapkv", kv_budget="0.5"), TypeError, "kv_budget must be a number"),
        (lambda m: attnsieve.patch(m, "dense", kv=1), TypeError, "kv must be"),
        (lambda m: attnsieve.patch(m, "block-topk", per_head="no"), TypeError, "parameter per_head must be a bool"),
        (lambda m: attnsieve.patch(m, "dense", kv="snapkv", kv_window=1.5), TypeError, "kv_window must be an int"),
        (lambda m: attnsieve.patch(m, "dense", layers={True: "dense"}), TypeError, "layers keys must be int"),
        (lambda m: attnsieve.patch(m, "dense", layers=[0]), TypeError, "layers must be a dict"),
        (lambda m: attnsieve.patch(m, "dense", layers={0: 5}), TypeError, r"layers\[0\] must be"),
    ],
    ids=["nn.Linear", "model-name", "unpatch-Linear", "method-int", "density-str", "block_size-float",
         "kv_budget-str", "kv-int", "per_head-str", "kv_window-float", "layers-bool-key", "layers-list",
         "layers-value"],
)
def test_public_entry_points_check_types_and_name_the_parameter(call, error, needle):
    model = tiny_llama()
    with pytest.raises(error, match=needle):
        call(model)
    assert getattr(model, "_attnsieve_patch", None) is None  # a refused patch leaves the model untouched


def test_every_bool_parameter_takes_only_bools():
    """per_head="no" used to be taken as true (a non-empty string); every bool field now refuses non-bools."""
    import dataclasses

    from attnsieve.cache import make_policy, policy_class, policy_names
    from attnsieve.methods import make

    classes = [(n, method_class(n).Params, lambda n, **kw: make(n, **kw)) for n in names()]
    classes += [(n, policy_class(n).Params, lambda n, **kw: make_policy(n, **kw)) for n in policy_names()]
    checked = 0
    for name, params, build in classes:
        for f in dataclasses.fields(params):
            if isinstance(getattr(params(), f.name), bool):
                with pytest.raises(TypeError, match=f"parameter {f.name} must be a bool"):
                    build(name, **{f.name: "no"})
                checked += 1
    assert checked > 0


def test_refuses_logit_softcapping():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="soft-capping"):
        attnsieve.patch(Gemma2ForCausalLM(cfg), "dense")


def test_refuses_learned_sinks():
    model = tiny_llama()
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(6))
    with pytest.raises(ValueError, match="sink"):
        attnsieve.patch(model, "dense")


def test_refuses_custom_4d_mask():
    model = tiny_llama()
    x = ids(20)
    mask4d = torch.tril(torch.ones(1, 1, 20, 20, dtype=torch.bool))
    with attnsieve.patched(model, "dense"), pytest.raises(ValueError, match="4D"):
        logits(model, x, attention_mask=mask4d)


def test_refuses_packed_sequences():
    model = tiny_llama()
    x = ids(20)
    pos = torch.cat([torch.arange(10), torch.arange(10)])[None]  # two sequences packed in one row
    with attnsieve.patched(model, "dense"), pytest.raises(ValueError, match="packed"):
        logits(model, x, position_ids=pos, use_cache=False)  # transformers detects packing without a cache


def test_nothing_registered_at_import():
    import subprocess
    import sys

    code = (
        "import attnsieve, attnsieve.methods\n"
        "from transformers import AttentionInterface\n"
        "assert 'attnsieve' not in AttentionInterface._global_mapping\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_whose_every_layer_slides_runs_the_method_in_each_window():
    from transformers import Gemma3ForCausalLM

    model = tiny_gemma3(sliding_window=40)
    cfg = model.config
    cfg.layer_types = ["sliding_attention"] * 4
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    x = ids(160)
    ref = logits(model, x)
    with attnsieve.patched(model, "block-topk", density=1.0, block_size=16) as p:
        out = logits(model, x)
    assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert set(p.layers.values()) == {"block-topk"} and p.stats.density() == 1.0
    with attnsieve.patched(model, "block-topk", density=0.3, block_size=16) as p:
        logits(model, x)
    assert p.stats.density() < 0.8  # measured against each layer's window, not the causal triangle


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=512, attn_implementation="sdpa")
    return BertModel(cfg).eval()


def test_bidirectional_encoder_runs_dense_exactly_and_non_causal_methods():
    model = tiny_bert()
    x = ids(200)
    mask = torch.ones(2, 200, dtype=torch.long)
    x = torch.cat([x, ids(200, seed=3)])
    mask[1, 150:] = 0  # right padding, as encoders use
    with torch.no_grad():
        ref = model(x, attention_mask=mask).last_hidden_state
        with attnsieve.patched(model, "dense") as p:
            out = model(x, attention_mask=mask).last_hidden_state
        assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert p.stats.density() == 1.0
        errs = []
        for landmarks in (8, 50, 200):  # 200 = one landmark per token: Nystrom is exact up to its pinv iteration
            with attnsieve.patched(model, "nystrom", num_landmarks=landmarks, pinv_iterations=20):
                approx = model(x[:1], attention_mask=mask[:1]).last_hidden_state
            errs.append(float((approx - ref[:1]).norm() / ref[:1].norm()))
    assert errs[0] > errs[2] and errs[2] < 1e-3, errs  # (falling error on structured inputs: test_method_lowrank)
    with pytest.raises(ValueError, match="causal method; this model's attention is bidirectional"):
        attnsieve.patch(model, "block-topk")
    with pytest.raises(ValueError, match="KV-cache policies are for decoders"):
        attnsieve.patch(model, "dense", kv="snapkv")


@pytest.mark.parametrize("name", [n for n in names() if not method_class(n).supports_causal_mask])
def test_non_causal_methods_refuse_decoders_at_patch_time(name):
    with pytest.raises(ValueError, match="non-causal"):
        attnsieve.patch(tiny_llama(), name)


def test_measured_density_counts_every_batch_row_and_skip_rules_are_reported():
    model = tiny_llama()
    x = torch.cat([ids(130), ids(130, seed=4)])
    with attnsieve.patched(model, "dense") as p:
        logits(model, x)
    assert p.stats.density() == 1.0
    with attnsieve.patched(model, "block-topk", density=1.0, block_size=16) as p:
        logits(model, x)
    assert p.stats.density() == pytest.approx(1.0)
    with attnsieve.patched(model, "blasst", density=0.3, block_size=16) as p:
        logits(model, x)
    assert p.stats.density() == pytest.approx(1.0)  # every score is computed
    assert 0 < p.stats.skipped_fraction() < 1
