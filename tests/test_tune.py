"""attnsieve tune: profiles, the allocation, verified plans, plan files, patch(plan=...), the CLI.

The tuner runs on tiny random-init models built here: a Llama whose layer 2 is a planted retrieval
layer (every query attends to one needle token far back) among diffuse random layers, and the
Gemma-3 layout (sliding and global layers) for applying plans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from attnsieve.cli import main
from attnsieve.eval.fidelity import continuation_logprobs, dense_reference, kl_and_top1
from attnsieve.integrations.hf import patched
from attnsieve.methods import LayerContext, exact_attention, make
from attnsieve.methods.heads import HeadSplit, head_calls
from attnsieve.tune import SCHEMA, LayerChoice, Plan, Target, fingerprint, load_plan
from attnsieve.tune.calibration import CALIB_SEED, CalibPrompt, task_prompts
from attnsieve.tune.profile import Candidate, Measurement, Profile, candidates_for, profile
from attnsieve.tune.search import PathPoint, lagrangian_path, layer_hull, search
from attnsieve.tune.tuner import TuneSpec, _uniform_check, tune

from helpers import assert_close
from tiny_models import (
    NEEDLE,
    save_tiny_eval_model,
    tiny_gemma3,
    tiny_llama,
    tiny_llama_retrieval,
    tiny_llama_retrieval_head,
)

SENSITIVE = 2
LENGTH = 256


def needle_prompts(n: int = 2, length: int = LENGTH) -> list[CalibPrompt]:
    """Random tokens with the needle early (beyond window's 4 sink tokens), 8 random answer tokens."""
    g = torch.Generator().manual_seed(123)
    out = []
    for i in range(n):
        ids = torch.randint(NEEDLE + 1, 97, (1, length + 8), generator=g)
        ids[0, 20 + 7 * i] = NEEDLE
        out.append(CalibPrompt(f"needle #{i}", ids[:, :length], ids[0, length:].tolist(), {"i": i}))
    return out


def density_of(choice: LayerChoice) -> float:
    return 1.0 if choice.method == "dense" else choice.params["density"]


@pytest.fixture(scope="module")
def retrieval():
    return tiny_llama_retrieval(SENSITIVE)


@pytest.fixture(scope="module")
def kl_plan(retrieval):
    spec = TuneSpec(Target("kl", 0.02), candidates_for(["window"], [0.1, 0.25, 0.5]), objective="density",
                    granularity="layer")
    return tune(retrieval, needle_prompts(), spec)


def test_the_sensitive_layer_gets_more_budget(kl_plan):
    plan, report = kl_plan
    dens = {i: density_of(c) for i, c in plan.layers.items()}
    assert sorted(dens) == [0, 1, 2, 3]
    assert all(dens[SENSITIVE] > d for i, d in dens.items() if i != SENSITIVE), dens
    # the probes found why: the planted layer is by far the most sensitive per unit of error
    weights = {int(i): p["weight"] for i, p in report["probes"].items()}
    assert all(weights[SENSITIVE] > 100 * w for i, w in weights.items() if i != SENSITIVE), weights
    assert plan.measured_density < 0.5  # the diffuse layers stay sparse


def test_the_verified_target_holds_on_the_calibration_set(retrieval, kl_plan):
    plan, report = kl_plan
    assert plan.kl <= 0.02 and plan.top1 is not None
    # measured again here, independently of the tuner's own verification
    kls = []
    for p in needle_prompts():
        ref = dense_reference(retrieval, p.prompt_ids, p.answer_ids)
        with patched(retrieval, plan=plan) as h:
            logprobs = continuation_logprobs(retrieval, p.prompt_ids, p.answer_ids)
        assert h.stats.density() < 1.0
        kls.append(kl_and_top1(ref.logprobs, logprobs)[0])
    assert sum(kls) / len(kls) == pytest.approx(plan.kl, rel=1e-4, abs=1e-7)
    ff = report["full_forwards"]
    assert ff["dense_reference"] == 2 and ff["probe"] == 2 * 4 and ff["verify"] % 2 == 0
    assert ff["total"] == ff["dense_reference"] + ff["probe"] + ff["verify"]
    verified = report["search"]["verified"]
    assert 1 <= len(verified) <= 6 and any(v["met"] for v in verified)
    assert all(v["kl"] > 0.02 for v in verified if not v["met"])
    # the cheapest plan on the path (every layer at 10%) misses the target: the search had to spend
    assert report["search"]["path"][0]["predicted_kl"] > 0.02


def test_top1_target(retrieval):
    spec = TuneSpec(Target("top1", 1.0), candidates_for(["window"], [0.1, 0.5]), objective="density", max_verify=4)
    plan, report = tune(retrieval, needle_prompts(1), spec)
    assert plan.top1 == 1.0
    assert len(report["search"]["verified"]) <= 4


def test_layer_error_target_takes_each_layers_cheapest_candidate_within_the_bound(retrieval):
    spec = TuneSpec(Target("layer_error", 0.5), candidates_for(["window"], [0.1, 0.25, 0.5]), objective="time",
                    granularity="layer")
    plan, report = tune(retrieval, needle_prompts(1), spec)
    prof = report["profile"]
    for i, lab in report["choice"].items():
        assert prof[i][lab]["rel_err"] <= 0.5
        cheaper_ok = [c for c, m in prof[i].items() if m["rel_err"] <= 0.5 and m["time_s"] < prof[i][lab]["time_s"]]
        assert not cheaper_ok, (i, lab, cheaper_ok)
    assert plan.layers[SENSITIVE].method == "dense"  # no window covers the needle within 50% error
    assert report["full_forwards"]["probe"] == 0
    assert 0 < plan.time_ratio and plan.kl is not None


def test_plan_round_trip(tmp_path, kl_plan):
    plan, _ = kl_plan
    path = plan.save(tmp_path / "plan.json")
    doc = json.loads(path.read_text())
    for key in ("schema", "model", "fingerprint", "target", "layers", "calibration", "kl", "top1",
                "measured_density", "time_ratio", "versions", "threads", "seed", "dtype", "device"):
        assert key in doc, key
    assert doc["schema"] == SCHEMA and doc["target"] == {"kind": "kl", "value": 0.02}
    back = load_plan(path)
    assert back.to_json() == json.loads(json.dumps(plan.to_json(), default=str))
    assert back.layers == plan.layers and back.fingerprint == plan.fingerprint


def _logits(model, ids, **spec):
    with torch.no_grad(), patched(model, **spec):
        return model(ids).logits


def test_patch_plan_equals_the_equivalent_layer_overrides(tmp_path):
    model = tiny_gemma3(sliding_window=16)
    layers = {1: LayerChoice("block-topk", {"density": 0.3, "block_size": 16}),
              3: LayerChoice("window", {"density": 0.4, "block_size": 16})}
    plan = Plan("tiny", fingerprint(model), Target("kl", 0.1), layers)
    ids = torch.randint(1, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids, method="dense", layers={i: c.make() for i, c in layers.items()})
    assert torch.equal(_logits(model, ids, plan=plan), want)
    assert torch.equal(_logits(model, ids, plan=plan.save(tmp_path / "p.json")), want)
    assert not torch.allclose(_logits(model, ids), want)  # the plan did change something
    with patched(model, plan=plan) as p:
        assert p.plan is plan and p.layers[0] == "exact-local" and p.layers[3] == "window"
    # a global layer the plan leaves out stays dense
    only3 = Plan("tiny", fingerprint(model), Target("kl", 0.1), {3: layers[3]})
    assert torch.equal(_logits(model, ids, plan=only3),
                       _logits(model, ids, method="dense", layers={3: layers[3].make()}))


def test_a_plan_for_another_model_is_refused(tmp_path):
    gemma, llama = tiny_gemma3(), tiny_llama()
    plan = Plan("tiny-gemma", fingerprint(gemma), Target("kl", 0.1), {1: LayerChoice("window", {"density": 0.5})})
    with pytest.raises(ValueError, match="tuned for 'tiny-gemma'.*different architecture"):
        patched(llama, plan=plan).__enter__()
    with pytest.raises(ValueError, match="different architecture"):
        plan.check_model(llama.config)
    plan.check_model(tiny_gemma3(seed=1))  # other weights, same architecture: the same fingerprint
    with pytest.raises(ValueError, match="no method, layers"):
        patched(gemma, "window", plan=plan).__enter__()


@pytest.mark.parametrize("text,needle", [
    ("{not json", "corrupted"),
    ("[1, 2]", "expected a JSON object"),
    ('{"model": "m"}', "no integer 'schema'"),
    ('{"schema": 99, "model": "m", "fingerprint": "x", "target": {"kind": "kl", "value": 0.1}, "layers": {}}',
     "schema 99, newer"),
    ('{"schema": 1, "model": "m", "fingerprint": "x", "target": {"kind": "kl", "value": 0.1}}', "missing field"),
    ('{"schema": 1, "model": "m", "fingerprint": "x", "target": {"kind": "kl", "value": -1}, "layers": {}}',
     "target-kl must be > 0"),
    ('{"schema": 1, "model": "m", "fingerprint": "x", "target": {"kind": "kl", "value": 0.1}, '
     '"layers": {"1": {"method": "nope"}}}', "layer 1: unknown method 'nope'"),
    ('{"schema": 1, "model": "m", "fingerprint": "x", "target": {"kind": "kl", "value": 0.1}, '
     '"layers": {"a": {"method": "dense"}}}', "not a layer index"),
    ('{"schema": 1, "model": "m", "fingerprint": "x", "target": {"kind": "kl", "value": 0.1}, '
     '"layers": {"1": {"method": "window", "params": {"density": 2}}}}', "density must be in"),
])
def test_bad_plan_files_are_value_errors(tmp_path, text, needle):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        load_plan(path)


def test_targets_are_checked():
    for kind, value, needle in [("kl", 0, "> 0"), ("top1", 1.5, r"\(0, 1\]"), ("layer_error", -0.1, "> 0"),
                                ("kl", float("nan"), "finite"), ("speed", 1.0, "target kind")]:
        with pytest.raises(ValueError, match=needle):
            Target(kind, value)


def test_calibration_seeds_are_disjoint_from_eval(tok):
    prompts = task_prompts(tok, ["passkey", "niah_single"], [512], 3, "repeat", seed=0)
    assert [p.meta["task"] for p in prompts] == ["passkey", "niah_single", "passkey"]
    assert all(p.meta["seed"] >= CALIB_SEED for p in prompts)
    assert [p.meta["depth"] for p in prompts] == pytest.approx([0.25 / 3, 1.25 / 3, 2.25 / 3])
    assert all(p.prompt_ids.shape == (1, 512) and p.answer_ids for p in prompts)


# ---- per-head plans ----

RETRIEVAL_HEAD = 1  # query head 1 of layer SENSITIVE retrieves the needle; heads 0, 2, 3 are diffuse


@pytest.fixture(scope="module")
def retrieval_head():
    return tiny_llama_retrieval_head(SENSITIVE, RETRIEVAL_HEAD)


def _unit_density(report: dict, layer: int, head: int) -> float:
    unit = f"{layer}.{head}"
    return report["profile"][unit][report["choice"][unit]]["density"]


@pytest.mark.parametrize("methods", [["window"], ["block-topk", "window"]], ids=["duo-typing", "per-head-budgets"])
def test_a_planted_retrieval_head_gets_more_budget_than_its_siblings(retrieval_head, methods):
    sets = {"block-topk": {"block_size": 16, "summary": "mean"}} if "block-topk" in methods else {}
    spec = TuneSpec(Target("kl", 0.02), candidates_for(methods, [0.1, 0.25, 0.5], sets), objective="density")
    plan, report = tune(retrieval_head, needle_prompts(), spec)
    assert plan.kl <= 0.02 and report["granularity"] == "head"
    layer = plan.layers[SENSITIVE]
    assert layer.method == "per-head" and len(layer.heads) == 4
    mine = _unit_density(report, SENSITIVE, RETRIEVAL_HEAD)
    siblings = [_unit_density(report, SENSITIVE, h) for h in range(4) if h != RETRIEVAL_HEAD]
    assert all(mine > 2 * d for d in siblings), (mine, siblings)
    if methods == ["window"]:  # DuoAttention's typing: the retrieval head dense, its siblings streaming
        assert layer.heads[RETRIEVAL_HEAD].method == "dense"
        assert all(h.method == "window" for i, h in enumerate(layer.heads) if i != RETRIEVAL_HEAD)
    # the layers without a retrieval head stay sparse on every head
    assert all(c.method != "dense" and c.heads is None for i, c in plan.layers.items() if i != SENSITIVE)
    assert plan.measured_density < 0.4
    # the plan as applied runs each head group with its own method and meets the verified numbers
    p = needle_prompts()[0]
    with patched(retrieval_head, plan=plan) as h:
        continuation_logprobs(retrieval_head, p.prompt_ids, p.answer_ids)
    assert h.layers[SENSITIVE] == "per-head" and h.stats.density() < 0.4


def _qkv(H=6, Hkv=2, T=100, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, T, D, generator=g) for n in (H, Hkv, Hkv)]


@pytest.mark.parametrize("heads,group,calls", [
    ([0, 1, 2, 3, 4, 5], 3, [([0, 1, 2, 3, 4, 5], [0, 1])]),
    ([1, 4], 3, [([1, 4], [0, 1])]),  # one head of each KV group: one call, group size 1
    ([0, 1, 4], 3, [([4], [1]), ([0, 1], [0])]),  # uneven: one call per count
    ([2], 1, [([2], [2])]),
])
def test_head_calls_keep_grouped_query_layout(heads, group, calls):
    assert head_calls(heads, group) == calls


@pytest.mark.parametrize("H,Hkv", [(6, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_head_split_runs_each_head_with_its_own_method(H, Hkv):
    q, k, v = _qkv(H, Hkv)
    ctx = LayerContext(0, 0.25)
    choices = [make("dense"), make("window", window=24, sink=2, block_size=16),
               make("block-topk", density=0.3, block_size=16)]
    per_head = [choices[h % 3] for h in range(H)]
    res = HeadSplit(per_head).prefill(q, k, v, ctx)
    cells = 0
    for h, m in enumerate(per_head):
        j = h // (H // Hkv)
        alone = m.prefill(q[:, h : h + 1], k[:, j : j + 1], v[:, j : j + 1], ctx)
        assert_close(res.out[:, h : h + 1], alone.out, what=f"head {h}")
        cells += alone.cells
    assert res.cells == cells < exact_attention(q, k, v, ctx).cells


def test_an_all_dense_head_split_is_exact_attention():
    q, k, v = _qkv()
    ctx = LayerContext(0, 0.25)
    assert torch.equal(HeadSplit([make("dense")] * 6).prefill(q, k, v, ctx).out, exact_attention(q, k, v, ctx).out)
    # dense and window-covering-everything heads: a real split, still exact
    mixed = HeadSplit([make("dense"), make("window", window=1 << 20)] * 3).prefill(q, k, v, ctx)
    assert_close(mixed.out, exact_attention(q, k, v, ctx).out)
    with pytest.raises(ValueError, match="names 4 heads; layer 0 has 6"):
        HeadSplit([make("dense"), make("window")] * 2).prefill(q, k, v, ctx)


def test_patch_with_an_all_dense_per_head_plan_equals_dense_logits():
    model = tiny_gemma3(sliding_window=16)
    ids = torch.randint(1, 97, (1, 150), generator=torch.Generator().manual_seed(0))
    dense_heads = LayerChoice("per-head", {}, [LayerChoice("dense")] * 4)
    plan = Plan("tiny", fingerprint(model), Target("kl", 0.1), {1: dense_heads, 3: dense_heads})
    assert torch.equal(_logits(model, ids, plan=plan), _logits(model, ids, method="dense"))
    exactish = LayerChoice("per-head", {}, [LayerChoice("dense"), LayerChoice("window", {"window": 1 << 20})] * 2)
    plan = Plan("tiny", fingerprint(model), Target("kl", 0.1), {1: exactish, 3: exactish})
    assert_close(_logits(model, ids, plan=plan), _logits(model, ids, method="dense"), atol=1e-4, rtol=1e-4)
    # a sparse per-head plan changes the output of exactly the heads it names
    sparse = LayerChoice("per-head", {}, [LayerChoice("dense"), LayerChoice("window", {"window": 20})] * 2)
    plan = Plan("tiny", fingerprint(model), Target("kl", 0.1), {3: sparse})
    with patched(model, plan=plan) as p:
        with torch.no_grad():
            model(ids)
        # half the heads at a 20-token window, half dense
        assert p.layers[3] == "per-head" and 0.5 < p.stats.per_layer()[3] < 0.7 and p.stats.per_layer()[1] == 1.0


def test_per_head_plan_round_trip_and_schema(tmp_path):
    model = tiny_gemma3()
    heads = [LayerChoice("dense"), LayerChoice("window", {"density": 0.2}),
             LayerChoice("block-topk", {"density": 0.1, "block_size": 16}), LayerChoice("window", {"density": 0.2})]
    plan = Plan("tiny", fingerprint(model), Target("kl", 0.1),
                {1: LayerChoice.per_head(heads), 3: LayerChoice.per_head([LayerChoice("dense")] * 4)})
    assert plan.layers[3] == LayerChoice("dense")  # identical heads collapse to one whole-layer choice
    doc = json.loads(plan.save(tmp_path / "p.json").read_text())
    assert doc["schema"] == SCHEMA == 2
    assert doc["layers"]["1"] == {"method": "per-head", "heads": [h.to_json() for h in heads]}
    back = load_plan(tmp_path / "p.json")
    assert back.layers == plan.layers and back.to_json() == doc
    assert isinstance(back.methods()[1], HeadSplit)
    # a schema-1 file (per-layer only) still loads
    v1 = {**doc, "schema": 1, "layers": {"3": {"method": "window", "params": {"density": 0.5}}}}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert load_plan(tmp_path / "v1.json").layers == {3: LayerChoice("window", {"density": 0.5})}
    # a plan whose heads do not match the model is refused before it runs
    three = Plan("tiny", fingerprint(model), Target("kl", 0.1), {1: LayerChoice.per_head(heads[:3])})
    with pytest.raises(ValueError, match="3 per-head choices; the model has 4 query heads"):
        patched(model, plan=three).__enter__()


@pytest.mark.parametrize("layer,needle", [
    ({"method": "per-head", "heads": [{"method": "dense"}]}, "need plan schema 2"),
    ({"heads": []}, "non-empty list"),
    ({"method": "window", "heads": [{"method": "dense"}]}, "no method of its own"),
    ({"heads": [{"method": "nope"}]}, "unknown method 'nope'"),
    ({"heads": [{"method": "per-head"}]}, "do not nest"),
    ({"method": "per-head"}, "needs a 'heads' list"),
])
def test_bad_per_head_entries_are_value_errors(tmp_path, layer, needle):
    doc = {"schema": 1 if "schema 2" in needle else 2, "model": "m", "fingerprint": "x",
           "target": {"kind": "kl", "value": 0.1}, "layers": {"1": layer}}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=needle):
        load_plan(tmp_path / "p.json")


def test_per_head_profile_errors_add_up_to_the_layer_error(retrieval_head):
    refs = [dense_reference(retrieval_head, p.prompt_ids, p.answer_ids) for p in needle_prompts(1)]
    cands = candidates_for(["window"], [0.1, 0.5])
    by_layer, by_head = profile(refs, cands), profile(refs, cands, per_head=True)
    assert by_head.heads == 4 and by_head.units[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    for layer in by_layer.layers:
        for lab in by_layer.table[layer]:
            whole, heads = by_layer.get(layer, lab), by_head.layer_row(layer)[lab]
            assert heads.err == pytest.approx(whole.err, rel=1e-4, abs=1e-6)
            assert heads.cells == whole.cells and heads.exact_cells == whole.exact_cells
    # the retrieval head carries its layer's error; its siblings almost none
    errs = [by_head.get((SENSITIVE, h), "window[density=0.1]").err for h in range(4)]
    assert errs[RETRIEVAL_HEAD] > 10 * max(e for h, e in enumerate(errs) if h != RETRIEVAL_HEAD), errs


# ---- the allocation and the search, on made-up profiles (no model) ----

def _profile(rows: dict[int, dict[str, tuple[int, float]]]) -> Profile:
    """{layer: {label: (cells, rel_err)}} as a Profile (one prompt, 1000 exact cells per layer)."""
    table = {layer: {lab: Measurement([err], [None], cells, 1000, cells / 1000, 0.0)
                     for lab, (cells, err) in row.items()} for layer, row in rows.items()}
    return Profile(sorted(rows), [], table)


def test_hull_drops_dominated_and_non_convex_candidates():
    prof = _profile({0: {"dense": (1000, 0.0), "a": (100, 1.0), "b": (200, 0.9), "c": (300, 0.2),
                         "d": (400, 0.5)}})
    # d is dominated by c; b lies above the segment a-c
    assert layer_hull(prof, 0, "density") == ["a", "c", "dense"]


def test_path_moves_the_most_sensitive_layer_first_and_ends_exact():
    row = {"dense": (1000, 0.0), "lo": (100, 1.0), "mid": (400, 0.3)}
    prof = _profile({0: row, 1: row})
    path = lagrangian_path(prof, "density", {0: 1.0, 1: 50.0})
    assert path[0].choice == {0: "lo", 1: "lo"} and path[-1].choice == {0: "dense", 1: "dense"}
    assert path[1].moved == 1
    costs = [p.cost for p in path]
    preds = [p.predicted for p in path]
    assert costs == sorted(costs) and preds == sorted(preds, reverse=True)


@dataclass
class _Fake:
    kl: float


@pytest.mark.parametrize("threshold", [0, 3, 7, 11])
@pytest.mark.parametrize("model_error", [0.2, 1.0, 5.0])
def test_search_finds_the_cheapest_passing_plan(threshold, model_error):
    # a path of 12 plans whose true KL falls with the index; the model is off by `model_error`
    true_kl = [0.1 * (11 - i) / 11 * (1 if i < threshold else 0.1) for i in range(12)]
    target = Target("kl", 0.1 * (11 - threshold) / 11 * 0.1 + 1e-9 if threshold < 11 else 1e-9)
    path = [PathPoint({}, i, true_kl[i] * model_error) for i in range(12)]
    calls = []

    def verify(i):
        calls.append(i)
        return _Fake(true_kl[i])

    index, tried = search(path, target, verify, lambda r: target.met(kl=r.kl), lambda r: r.kl, max_verify=8)
    assert index == threshold
    assert len(calls) == len(set(calls)) <= 8 and 11 not in calls  # the exact end is never run


# ---- the command line ----

@pytest.fixture(scope="module")
def tok():
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_eval_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def cli(capsys):
    def run(*args: str):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.mark.parametrize("args,needle", [
    ([], "exactly one of --target-kl"),
    (["--target-kl", "0.1", "--target-top1", "0.9"], "exactly one of --target-kl"),
    (["--target-top1", "1.5"], "--target-top1 must be in (0, 1]"),
    (["--target-kl", "-1"], "--target-kl must be > 0"),
    (["--target-kl", "0.1", "--methods", "nope"], "unknown method"),
    (["--target-kl", "0.1", "--density", "0,0.5"], "density must be in (0, 1]"),
    (["--target-kl", "0.1", "--calib", "0"], "--calib must be >= 1"),
    (["--target-kl", "0.1", "--reps", "0"], "--reps must be >= 1"),
    (["--target-kl", "0.1", "--max-verify", "0"], "--max-verify must be >= 1"),
    (["--target-kl", "0.1", "--tasks", "nope"], "unknown calibration task"),
    (["--target-kl", "0.1", "--objective", "speed"], "--objective must be one of"),
    (["--target-kl", "0.1", "--granularity", "block"], "--granularity must be one of head, layer"),
    (["--target-kl", "0.1", "--prompt-file", "/no/such/file"], "does not exist"),
    (["--target-kl", "0.1", "--lengths", "32"], "each length must be in [64"),
    (["--target-kl", "0.1", "--set", "window.bogus=1"], "bogus"),
])
def test_tune_bad_input_is_one_line_and_exit_2(cli, model_dir, tmp_path, args, needle):
    code, _, err = cli("tune", "--model", model_dir, "--out", str(tmp_path / "plan.json"), *args)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("attnsieve: error: ") and needle in err, err


def test_tune_out_must_be_a_writable_file_path(cli, model_dir, tmp_path):
    code, _, err = cli("tune", "--model", model_dir, "--target-kl", "0.1", "--out", str(tmp_path))
    assert code == 2 and "is a folder" in err
    code, _, err = cli("tune", "--model", model_dir, "--target-kl", "0.1", "--out", str(tmp_path / "no" / "p.json"))
    assert code == 2 and "does not exist" in err


def test_plan_on_generate_and_eval_bad_input(cli, model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    code, _, err = cli("generate", "--model", model_dir, "--prompt", "hi", "--plan", str(bad))
    assert code == 2 and err.count("\n") == 1 and "corrupted" in err
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"schema": SCHEMA + 1}))
    code, _, err = cli("eval", "--model", model_dir, "--out", str(tmp_path / "ev"), "--plan", str(newer))
    assert code == 2 and err.count("\n") == 1 and "newer than this attnsieve" in err
    other = Plan("llama", fingerprint(tiny_llama()), Target("kl", 0.1), {}).save(tmp_path / "other.json")
    code, _, err = cli("generate", "--model", model_dir, "--prompt", "hi", "--plan", str(other))
    assert code == 2 and err.count("\n") == 1 and "different architecture" in err
    code, _, err = cli("generate", "--model", model_dir, "--prompt", "hi", "--plan", str(other), "--method", "window")
    assert code == 2 and "not both" in err


def test_tune_then_generate_and_eval_with_the_plan(cli, model_dir, tmp_path):
    out = tmp_path / "plan.json"
    code, stdout, err = cli("tune", "--model", model_dir, "--target-kl", "0.05", "--methods", "window",
                            "--density", "0.25,0.5", "--lengths", "512", "--tasks", "passkey", "--calib", "2",
                            "--objective", "density", "--dtype", "float32", "--out", str(out))
    assert code == 0, err
    doc = json.loads(stdout.strip().splitlines()[-1])
    assert doc["command"] == "tune" and doc["kl"] <= 0.05 and {"versions", "threads", "seed"} <= doc.keys()
    assert doc["full_forwards"]["total"] >= 2
    plan = load_plan(out)
    assert plan.calibration["prompts"] == 2 and plan.calibration["lengths"] == [512]
    assert all(item["seed"] >= CALIB_SEED for item in plan.calibration["items"])
    code, stdout, err = cli("generate", "--model", model_dir, "--prompt", "hello there", "--plan", str(out),
                            "--max-new-tokens", "2", "--dtype", "float32", "--json")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["plan"] == str(out)
    code, _, err = cli("eval", "--model", model_dir, "--methods", "dense", "--plan", str(out), "--tasks", "passkey",
                       "--lengths", "512", "--samples", "1", "--dtype", "float32", "--out", str(tmp_path / "ev"))
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    by = {r["method"]: r for r in rows}
    assert set(by) == {"dense", "plan"}
    assert by["plan"]["plan"]["fingerprint"] == plan.fingerprint and by["plan"]["config"] == plan.label()
    assert by["plan"]["plan"]["layers"] == {str(i): c.to_json() for i, c in plan.layers.items()}
    assert by["plan"]["kl"] is not None


def test_a_method_is_made_once_per_candidate():
    cands = candidates_for(["window", "dense"], [0.1, 0.5])
    assert [c.label for c in cands] == ["window[density=0.1]", "window[density=0.5]", "dense"]
    assert cands[0].make().params == make("window", density=0.1).params


def _tiny_plan(model_dir, tmp_path) -> Path:
    from transformers import AutoConfig

    heads = LayerChoice.per_head([LayerChoice("dense"), LayerChoice("window", {"density": 0.5, "block_size": 16})])
    return Plan("tiny", fingerprint(AutoConfig.from_pretrained(model_dir)), Target("kl", 0.05), {1: heads}).save(
        tmp_path / "plan.json")


def test_plan_on_demo_and_bench_prefill(cli, model_dir, tmp_path):
    path = _tiny_plan(model_dir, tmp_path)
    code, stdout, err = cli("demo", "--model", model_dir, "--lengths", "256", "--depths", "0.5", "--plan", str(path),
                            "--dtype", "float32")
    assert code == 0, err
    rows = json.loads(stdout.strip().splitlines()[-1])["rows"]
    assert [r["method"] for r in rows] == ["dense", "window", "block-topk", "plan"]
    plan_row = rows[-1]
    assert plan_row["config"] == load_plan(path).label() and plan_row["plan"]["file"] == str(path)
    assert plan_row["plan"]["layers"]["1"]["method"] == "per-head" and 0.5 < plan_row["density"] < 1
    assert all(r["plan"] is None for r in rows[:-1])
    code, stdout, err = cli("bench", "prefill", "--model", model_dir, "--plan", str(path), "--length", "256",
                            "--dtype", "float32", "--json")
    assert code == 0, err
    row = json.loads(stdout.strip().splitlines()[-1])
    assert row["method"] == "plan" and row["params"] == {} and row["plan"]["file"] == str(path)
    assert row["plan"]["fingerprint"] == load_plan(path).fingerprint and 0.5 < row["density"] < 1
    assert {"versions", "threads", "seed", "dense_s", "exact_s", "s"} <= row.keys()
    code, _, err = cli("eval", "--model", model_dir, "--methods", "dense", "--plan", str(path), "--tasks",
                       "passkey,ppl", "--lengths", "256", "--samples", "1", "--dtype", "float32",
                       "--out", str(tmp_path / "ev"))
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    plan_rows = [r for r in rows if r["method"] == "plan"]
    assert len(plan_rows) == 2 and all(r["plan"]["layers"]["1"]["method"] == "per-head" for r in plan_rows)
    assert all(0.5 < r["density"] < 1 for r in plan_rows)


def test_plan_on_demo_and_bench_prefill_bad_input(cli, model_dir, tmp_path):
    path = _tiny_plan(model_dir, tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    other = Plan("llama", fingerprint(tiny_llama()), Target("kl", 0.1), {}).save(tmp_path / "other.json")
    for args, needle in [
        (["bench", "prefill", "--plan", str(path), "--method", "window"], "not both"),
        (["bench", "prefill", "--plan", str(path), "--density", "0.2"], "not both"),
        (["bench", "prefill", "--plan", str(bad)], "corrupted"),
        (["bench", "prefill", "--plan", str(other)], "different architecture"),
        (["demo", "--plan", str(bad)], "corrupted"),
        (["demo", "--plan", str(other)], "different architecture"),
        (["demo", "--plan", str(tmp_path / "missing.json")], "does not exist"),
    ]:
        code, _, err = cli(*args[:2], "--model", model_dir, *args[2:]) if args[0] == "bench" else \
            cli(args[0], "--model", model_dir, *args[1:])
        assert code == 2 and err.count("\n") == 1 and needle in err, (args, err)


def test_tune_validate_writes_the_report_and_the_frontier_plot(cli, model_dir, tmp_path):
    out = tmp_path / "plan.json"
    code, stdout, err = cli("tune", "--model", model_dir, "--target-kl", "0.05", "--methods", "window,block-topk",
                            "--density", "0.25,0.5", "--set", "block-topk.block_size=16", "--lengths", "256",
                            "--tasks", "passkey", "--calib", "1", "--objective", "density", "--dtype", "float32",
                            "--validate", "--validate-samples", "2", "--out", str(out))
    assert code == 0, err
    doc = json.loads(stdout.strip().splitlines()[-1])
    files = doc["validation"]["files"]
    assert files == {"json": str(tmp_path / "plan.validation.json"), "markdown": str(tmp_path / "plan.validation.md"),
                     "plot": str(tmp_path / "plan.frontier.png")}
    assert (tmp_path / "plan.frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    v = json.loads((tmp_path / "plan.validation.json").read_text())
    assert {"versions", "threads", "seed", "dtype", "device"} <= v.keys()
    # held out: eval's seeds and depths on the other haystack, never the calibration's
    assert [(i["seed"], i["depth"], i["haystack"]) for i in v["prompts"]["items"]] == [(0, 0.25, "repeat"),
                                                                                     (1, 0.75, "repeat")]
    for row in (v["dense"], v["plan"], v["best_uniform"]):
        assert {"kl", "top1", "accuracy", "measured_density", "time_ratio"} <= row.keys()
    assert v["dense"]["kl"] == 0 and v["dense"]["measured_density"] == 1
    assert sorted(u["config"] for u in v["uniform"]) == sorted(
        c for c in load_plan(out).extra["tuning"]["candidates"] if c != "dense")
    # the best uniform configuration is the cheapest one at least as faithful as the plan (dense if none is)
    ok = [u for u in v["uniform"] if u["kl"] <= v["plan"]["kl"]]
    best = min(ok, key=lambda u: u["measured_density"]) if ok else v["dense"]
    assert v["best_uniform"]["config"] == best["config"]
    assert v["cost_vs_best_uniform"] == pytest.approx(v["plan"]["measured_density"] / best["measured_density"])
    assert sum(f["chosen"] for f in v["frontier"]) == 1 and len(v["frontier"]) >= 2
    assert v["full_forwards"] >= 2 * (1 + 1 + 2 + len(v["uniform"]) + 1)
    md = (tmp_path / "plan.validation.md").read_text()
    assert "best uniform of equal or better KL" in md and "plan.frontier.png" in md
    assert load_plan(out).extra["tuning"]["validation"]["plan"] == v["plan"]  # the plan file keeps it too


def test_validate_bad_input(cli, model_dir, tmp_path):
    code, _, err = cli("tune", "--model", model_dir, "--target-kl", "0.1", "--validate", "--validate-samples", "0",
                       "--out", str(tmp_path / "p.json"))
    assert code == 2 and err.count("\n") == 1 and "--validate-samples must be >= 1" in err


def test_ray_agrees_with_in_process(cli, model_dir, tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    args = ["tune", "--model", model_dir, "--target-kl", "0.02", "--methods", "window,block-topk", "--density",
            "0.25,0.5", "--set", "block-topk.block_size=16", "--lengths", "256", "--tasks", "passkey", "--calib", "3",
            "--objective", "density", "--dtype", "float32", "--validate", "--validate-samples", "2"]
    code, _, err = cli(*args, "--out", str(tmp_path / "local.json"))
    assert code == 0, err
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code, stdout, err = cli(*args, "--ray", "local", "--out", str(tmp_path / "ray.json"))
    finally:
        ray.shutdown()
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["ray"] == "local"
    a, b = load_plan(tmp_path / "local.json"), load_plan(tmp_path / "ray.json")
    assert a.layers == b.layers and a.fingerprint == b.fingerprint
    assert b.kl == pytest.approx(a.kl, rel=1e-4, abs=1e-7) and b.top1 == a.top1
    assert b.measured_density == a.measured_density
    ta, tb = a.extra["tuning"], b.extra["tuning"]
    assert ta["full_forwards"] == tb["full_forwards"] and ta["choice"] == tb["choice"]
    for unit, row in ta["profile"].items():  # 3 prompts over 2 workers: merged in prompt order
        for lab, m in row.items():
            assert tb["profile"][unit][lab]["rel_err"] == pytest.approx(m["rel_err"], rel=1e-4, abs=1e-7)
            assert tb["profile"][unit][lab]["density"] == m["density"]
    assert [v["kl"] for v in tb["search"]["verified"]] == pytest.approx([v["kl"] for v in ta["search"]["verified"]],
                                                                        rel=1e-4, abs=1e-7)
    va, vb = ta["validation"], tb["validation"]
    for key in ("dense", "plan", "best_uniform"):
        assert vb[key]["kl"] == pytest.approx(va[key]["kl"], rel=1e-4, abs=1e-7)
        assert vb[key]["accuracy"] == va[key]["accuracy"]
        assert vb[key]["measured_density"] == va[key]["measured_density"]
    assert [u["kl"] for u in vb["uniform"]] == pytest.approx([u["kl"] for u in va["uniform"]], rel=1e-4, abs=1e-7)


@dataclass
class _FakeVerification:
    kl: float
    top1: float = 1.0

    def to_json(self) -> dict:
        return {"kl": self.kl, "top1": self.top1}


def _uniform_case():
    row = {"dense": (1000, 0.0), "m[density=0.1]": (100, 0.5), "m[density=0.3]": (300, 0.2),
           "m[density=0.5]": (500, 0.1), "m[density=0.7]": (700, 0.05), "w[density=0.1]": (100, 0.9)}
    prof = _profile({0: row, 1: row})
    prof.candidates = [Candidate("dense", "dense")]
    prof.candidates += [Candidate(lab, lab.split("[")[0]) for lab in row if lab != "dense"]
    true_kl = {"m[density=0.1]": 0.3, "m[density=0.3]": 0.04, "m[density=0.5]": 0.01,
               "m[density=0.7]": 0.005, "w[density=0.1]": 0.6}
    calls = []

    def run(choice, what):
        (lab,) = set(choice.values())
        calls.append(lab)
        return _FakeVerification(true_kl[lab])

    return prof, run, calls


@pytest.mark.parametrize("plan_cost,expect", [(1500, "m[density=0.3]"), (2000, "m[density=0.3]"), (500, None)])
def test_uniform_check_finds_the_cheapest_passing_uniform_configuration_below_the_plan(plan_cost, expect):
    """Per method, bisection over its uniform configurations cheaper than the path's plan; the cheapest
    passing one wins, none when every cheaper one fails (a made-up profile: 2 layers, costs in cells)."""
    prof, run, calls = _uniform_case()
    spec = TuneSpec(Target("kl", 0.05), prof.candidates, objective="density", max_uniform_verify=3)
    best, log = _uniform_check(prof, spec, run, lambda v: spec.target.met(kl=v.kl), plan_cost)
    got = None if best is None else set(best[0].values())
    assert got == (None if expect is None else {expect})
    assert all(e["cost"] < plan_cost for e in log)  # only configurations cheaper than the plan ran
    assert calls.count("w[density=0.1]") <= 1 and len([c for c in calls if c.startswith("m")]) <= 3
    assert [e["label"] for e in log] == calls and all(e["met"] == (e["kl"] <= 0.05) for e in log)
