"""The prepared GPU check of issue #16 (run by hand where a GPU exists; CI has none).

    python benchmarks/device_check.py --out docs/results/device-check            # on a GPU, < 8 minutes
    python benchmarks/device_check.py --out /tmp/dc --dry-run                    # anywhere: tiny shapes, CPU

Six parts, each recorded even when another fails:
1. supports: every registered sparse method estimates its support on the device and the support runs
   through FlexAttention there ("flex": torch.compile'd, Triton on CUDA); the same support, moved to
   the CPU, runs on the CPU reference path (matmul); out, lse and counted cells must agree. Each row
   also counts the host syncs the estimate made (CUDA's sync debug mode; on the CPU, the simulation of
   attnsieve.kernels.host_syncs), which tests/test_host_syncs.py bounds on the CPU.
2. kernels: `bench kernel` on the device at 32k and 64k tokens, density 0.1 and 0.05, Gemma-3
   (4 query / 1 KV heads x 256) and Llama-3-8B (32 / 8 x 128) head shapes, bf16, block-topk's
   support, with SDPA's FlashAttention backend as the baseline in the same run and every timing
   synchronised; each row carries block-topk's estimate share (estimate time / sparse time).
3. generate: the embedded model (gemma3-270m) patched with block-topk (density 0.1, backend flex)
   generates from an 8k-token passkey prompt; the stock model generates from the same prompt.
4. prefill: the embedded model's prefill at 32k tokens (`--prefill-length`): stock SDPA, attnsieve's
   exact path and block-topk at density 0.1 on flex, synchronised (`bench prefill --device cuda`).
5. decode_syncs: host syncs per decoding step of the embedded model with the snapkv policy at budget
   0.25 after a 2k-token prompt (sliding layers drop a token every step); the tests expect none.
6. the JSON of all of it, written to OUT/device_check.json, and printed last.

--dry-run runs the same code on tiny shapes on the CPU (eager FlexAttention for the supports, a tiny
random Llama for generate), to check the script itself without a GPU. A part that would pass the
time budget (--budget-s, default 420 s) is skipped and recorded as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnsieve.kernels import support_attention  # noqa: E402
from attnsieve.kernels.host_syncs import count_host_syncs  # noqa: E402
from attnsieve.methods import LayerContext, SparseMethod, describe, make, method_class, names  # noqa: E402
from attnsieve.runinfo import run_info  # noqa: E402

KERNEL_SHAPES = {"gemma3": (4, 1, 256), "llama3-8b": (32, 8, 128)}  # query heads, KV heads, head dim
PARTS = ("supports", "kernels", "generate", "decode_syncs", "prefill")
TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}  # flex on the device vs the float32 CPU reference


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for device_check.json")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, not a GPU")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip parts that would start after this (s)")
    ap.add_argument("--lengths", default="32768,65536", help="kernel benchmark lengths")
    ap.add_argument("--densities", default="0.1,0.05", help="kernel benchmark densities")
    ap.add_argument("--generate-length", type=int, default=8192, help="prompt tokens of the patched generate")
    ap.add_argument("--prefill-length", type=int, default=32768, help="prompt tokens of the embedded-model prefill")
    ap.add_argument("--skip", default="",
                    help="comma-separated parts to skip: supports, kernels, generate, decode_syncs, prefill")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {str(args.out)!r} is a file, not a folder")
    bad = set(filter(None, args.skip.split(","))) - set(PARTS)
    if bad:
        ap.error(f"--skip takes {', '.join(PARTS)}; got {', '.join(sorted(bad))}")
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        args.densities = [float(x) for x in args.densities.split(",") if x.strip()]
    except ValueError as e:
        ap.error(str(e))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU here (use --dry-run to check the script on the CPU)")
    return args


class _Syncs:
    """Host syncs inside the block: CUDA's own count (its sync debug mode warns at each one) on a GPU,
    attnsieve.kernels.host_syncs' simulation on the CPU (with `tensors` playing the device's)."""

    def __init__(self, dev: torch.device, *tensors: torch.Tensor):
        self.dev, self.tensors, self.count = dev, tensors, 0

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._sim = count_host_syncs(*self.tensors)
            self._record = self._sim.__enter__()
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            self._caught.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self._records)
        else:
            self._sim.__exit__(*exc)
            self.count = self._record.count
        return False


def check_supports(dev: torch.device, dry: bool) -> dict:
    """Every sparse method's support through flex on `dev` against the CPU matmul path."""
    backend = "flex-eager" if dry else "flex"
    B, H, Hkv, T, D = (1, 4, 2, 300, 32) if dry else (1, 8, 2, 2048, 64)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    ctx = LayerContext(0, D**-0.5)
    rows = {}
    for name in names():
        if not issubclass(method_class(name), SparseMethod):
            continue
        params = describe(name)["params"]
        kw = {"density": 0.2} if "density" in params else {}
        try:
            m = make(name, **kw)
            qd, kd, vd = q.to(dev), k.to(dev), v.to(dev)
            m.support(qd, kd, ctx)  # warm-up: one-off compilation and allocation are not the method's
            with _Syncs(dev, qd, kd) as syncs:
                support = m.support(qd, kd, ctx)
            res = support_attention(qd, kd, vd, support, scale=ctx.scale, backend=backend)
            cpu_support = type(support)(support.blocks.cpu(), support.block_size,
                                        None if support.row_mask is None else support.row_mask.cpu(),
                                        None if support.tokens is None else support.tokens.cpu())
            ref = support_attention(q, k, v, cpu_support, scale=ctx.scale, backend="matmul")
            fin = torch.isfinite(ref.lse)
            err_out = (res.out.cpu().float() - ref.out.float()).abs().max().item()
            err_lse = (res.lse.cpu().float() - ref.lse.float())[fin].abs().max().item() if bool(fin.any()) else 0.0
            same_cells = backend == "flex-eager" or res.cells == ref.cells
            rows[name] = {"out_err": err_out, "lse_err": err_lse, "cells": res.cells, "ref_cells": ref.cells,
                          "host_syncs": syncs.count,
                          "ok": err_out < TOL[torch.float32] and err_lse < TOL[torch.float32] and same_cells}
        except Exception as e:  # noqa: BLE001 - one method's failure is recorded, the others still run
            rows[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}
    rows["block-topk bf16 planner"] = _bf16_planner_agreement(dev, q, k, ctx)
    return rows


def _bf16_planner_agreement(dev: torch.device, q, k, ctx) -> dict:
    """block-topk's torch planner with bf16 queries on `dev` (tensor-core bounds on CUDA, accumulated in
    float32) against the same planner on the CPU (float32 bounds of the same bf16 values): the share of
    (query block, key block) choices and of per-row choices they agree on (only the order of float32
    accumulation differs, so near-ties may flip)."""
    from attnsieve.methods.block_topk import BlockTopK

    try:
        qb, kb = q.bfloat16(), k.bfloat16()
        m = make("block-topk", density=0.1)
        saved, BlockTopK.use_compiled = BlockTopK.use_compiled, False  # the torch planner on both sides
        try:
            dev_sup = m.support(qb.to(dev), kb.to(dev), ctx)
            cpu_sup = m.support(qb, kb, ctx)
        finally:
            BlockTopK.use_compiled = saved
        n_k = -(-k.shape[2] // cpu_sup.block_size)

        def union(sup):
            blocks = sup.blocks.cpu()
            mask = torch.zeros(*blocks.shape[:3], n_k + 1, dtype=torch.bool)
            return mask.scatter_(-1, torch.where(blocks >= 0, blocks, n_k), True)[..., :n_k]

        agree = (union(dev_sup) == union(cpu_sup)).float().mean().item()
        return {"block_agreement": agree, "ok": agree >= 0.99}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}


def bench_kernels(dev: torch.device, dry: bool, lengths, densities, deadline: float) -> list[dict]:
    from attnsieve.eval.bench import bench_kernel

    rows = []
    shapes = {"tiny-gqa": (4, 2, 32)} if dry else KERNEL_SHAPES
    lengths = [256, 512] if dry else lengths
    dtype = torch.float32 if dry else torch.bfloat16
    backend = "flex-eager" if dry else "flex"
    for shape, (h, hkv, d) in shapes.items():
        for n in lengths:
            for dens in densities:
                if time.monotonic() > deadline:
                    rows.append({"shape": shape, "length": n, "density": dens, "skipped": "time budget"})
                    continue
                try:
                    r = bench_kernel(n, dens, heads=h, kv_heads=hkv, head_dim=d, method="block-topk", reps=3,
                                     backend=backend, dtype=dtype, device=dev)
                    rows.append({"shape": shape, **r})
                except Exception as e:  # noqa: BLE001
                    rows.append({"shape": shape, "length": n, "density": dens, "error": f"{type(e).__name__}: {e}"})
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


class _IdsTokenizer:
    """What greedy decoding needs of a tokenizer, for the dry run's random model: no EOS, ids as text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def patched_generate(dev: torch.device, dry: bool, length: int) -> dict:
    from attnsieve.eval.generation import greedy
    from attnsieve.integrations.hf import patched

    if dry:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          attn_implementation="sdpa", pad_token_id=0)
        model, tok = LlamaForCausalLM(cfg).eval(), _IdsTokenizer()
        ids = torch.randint(1, 97, (1, 300), generator=torch.Generator().manual_seed(0))
        answers, new, backend = [], 4, "flex-eager"
    else:
        from attnsieve.eval.tasks.passkey import make_passkey
        from attnsieve.models import load

        model, tok = load("gemma3-270m", dtype=torch.bfloat16, device=dev)
        sample = make_passkey(tok, length, 0.5, 0)
        ids, answers, new, backend = sample.input_ids, sample.answers, 12, "flex"
    dense = greedy(model, tok, ids, new)
    with patched(model, "block-topk", density=0.1, backend=backend) as p:
        gen = greedy(model, tok, ids, new)
    return {
        "prompt_tokens": ids.shape[1], "backend": backend, "dense_text": dense.text, "text": gen.text,
        "answers": answers, "found": bool(answers) and all(a in gen.text for a in answers),
        "dense_found": bool(answers) and all(a in dense.text for a in answers),
        "dense_prefill_s": dense.prefill_s, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s,
        "density": p.stats.density(), "estimate_s": p.stats.estimate_s(),
    }


def decode_syncs(dev: torch.device, dry: bool, length: int = 2048, steps: int = 3) -> dict:
    """Host syncs in each decoding step with a KV policy (snapkv, budget 0.25) after a `length`-token prompt."""
    from attnsieve.integrations.hf import patched

    if dry:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        torch.manual_seed(0)
        cfg = Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=24,
                               layer_types=["sliding_attention", "full_attention"] * 2,
                               max_position_embeddings=1024, attn_implementation="sdpa", pad_token_id=0)
        model, length = Gemma3ForCausalLM(cfg).eval(), 200
        ids = torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(0))
    else:
        from attnsieve.models import load

        model, _ = load("gemma3-270m", dtype=torch.bfloat16, device=dev)
        ids = torch.randint(1000, 20000, (1, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(dev)
    counts = []
    with torch.no_grad(), patched(model, "dense", kv="snapkv", kv_budget=0.25):
        out = model(ids, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            with _Syncs(dev, nxt) as syncs:
                step = model(nxt, cache=cache, use_cache=True)
            counts.append(syncs.count)
            nxt = step.logits[:, -1:].argmax(-1)
    return {"prompt_tokens": length, "policy": "snapkv", "kv_budget": 0.25, "syncs_per_step": counts}


def embedded_prefill(dev: torch.device, dry: bool, length: int) -> dict:
    """The embedded model's prefill at `length` tokens: stock SDPA, attnsieve's exact path and block-topk at
    density 0.1 on the flex backend, synchronised, same prompt (`attnsieve bench prefill --device cuda`)."""
    from attnsieve.eval.bench import bench_prefill

    if dry:
        return {"skipped": "dry run (the embedded model at this length is a GPU check)"}
    from attnsieve.models import load

    model, tok = load("gemma3-270m", dtype=torch.bfloat16, device=dev)
    return bench_prefill(model, tok, "block-topk", length, params={"density": 0.1}, backend="flex")


def _run_part(run, deadline: float) -> dict:
    """One part's result: skipped past the time budget, its error (with the trace's end) if it raised."""
    if time.monotonic() > deadline:
        return {"skipped": "time budget"}
    try:
        return run()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    skip = set(filter(None, args.skip.split(",")))
    result = {"device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "dry_run": args.dry_run, **run_info(0, "bfloat16" if not args.dry_run else "float32", str(dev))}
    if "supports" not in skip:
        result["supports"] = check_supports(dev, args.dry_run)
        for name, r in result["supports"].items():
            print(f"support {name:22s} " + ("ok" if r["ok"] else "FAIL") + " " +
                  " ".join(f"{k}={v:.2e}" for k, v in r.items() if isinstance(v, float)) +
                  (f" host_syncs={r['host_syncs']}" if "host_syncs" in r else "") + (
                      f" {r['error']}" if "error" in r else ""))
    if "kernels" not in skip:
        result["kernels"] = bench_kernels(dev, args.dry_run, args.lengths, args.densities, deadline)
        for r in result["kernels"]:
            if "sparse_s" in r:
                print(f"kernel {r['shape']:10s} T{r['length']:6d} d{r['params'].get('density')}: {r['dense']} "
                      f"{r['dense_s'] * 1e3:.1f} ms, flex {r['sparse_s'] * 1e3:.1f} ms ({r['kernel_speedup']:.2f}x), "
                      f"estimate {r['estimate_s'] * 1e3:.1f} ms ({r['estimate_share']:.0%} of sparse), "
                      f"density {r['measured_density']:.3f}")
            else:
                print(f"kernel {r['shape']} T{r['length']} d{r['density']}: {r.get('error') or r.get('skipped')}")
    for part, run in (("generate", lambda: patched_generate(dev, args.dry_run, args.generate_length)),
                      ("decode_syncs", lambda: decode_syncs(dev, args.dry_run)),
                      ("prefill", lambda: embedded_prefill(dev, args.dry_run, args.prefill_length))):
        if part not in skip:
            result[part] = _run_part(run, deadline)
            print(f"{part}: {json.dumps({k: v for k, v in result[part].items() if k != 'trace'}, default=str)}")
    result["elapsed_s"] = time.monotonic() - t0
    result["supports_ok"] = all(r["ok"] for r in result.get("supports", {}).values())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, default=str))
    return 0 if result["supports_ok"] and "error" not in result.get("generate", {}) else 1


if __name__ == "__main__":
    sys.exit(main())
