"""The evaluation grid: methods x parameters x tasks x lengths x samples, resumable, optionally on Ray.

Each input (task, length, sample) is generated once; stock SDPA prefill is timed on it in the same
process as the methods compared with it; the dense reference (span log-probabilities, captured
layer inputs, perplexity) is computed once per input and reused by every configuration. Rows are
appended to `results.jsonl` as they finish (complete lines, under the output folder's lock: see
`eval/results.py`), so an interrupted run resumes where it stopped, a finished run recomputes
nothing, and a second run on the same folder is refused instead of duplicating cells.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnsieve.eval.efficiency import AttentionTimer, PeakRSS
from attnsieve.eval.fidelity import dense_reference, method_fidelity
from attnsieve.eval.generation import greedy
from attnsieve.eval.perplexity import perplexity
from attnsieve.eval.results import RESULTS, append_rows, claim, read_rows, row_key
from attnsieve.eval.tasks import TASKS, score_contains
from attnsieve.eval.tasks.base import encode
from attnsieve.eval.tasks.haystack import haystack_ids
from attnsieve.integrations.hf import patched
from attnsieve.methods import has_param, make, names
from attnsieve.runinfo import run_info

PPL = "ppl"  # perplexity of natural prose: not a retrieval task, scored by ppl against dense
RERANK = "rerank"  # attention re-ranking (ICR) of documentation passages: scored by top-1 and nDCG@10


@dataclass(frozen=True)
class MethodConfig:
    label: str  # "dense", or "name[key=value,...]" listing the parameters set, "+policy@budget" with a KV policy
    method: str
    params: tuple[tuple[str, Any], ...]
    kv: str | None = None  # decoding-cache policy (None: transformers' DynamicCache)
    kv_budget: float | None = None
    kv_params: tuple[tuple[str, Any], ...] = ()
    # "aware": the policy compresses the prompt with its question; "agnostic": the context alone, then
    # the question (and the answer) are appended to the frozen compressed cache
    kv_mode: str = "aware"
    # a tuned plan (attnsieve.tune.Plan): method "plan", one method per layer; its label names it, and
    # it stays out of hashing (a Plan is mutable)
    plan: Any = field(default=None, compare=False, hash=False)

    def make(self):
        return make(self.method, **dict(self.params))

    def layer_methods(self, force_causal: bool = False) -> dict:
        """The plan's {layer: method}; with `force_causal`, look-ahead methods in their leak-free form."""
        return {idx: choice.make(force_causal) for idx, choice in sorted(self.plan.layers.items())}

    def patch_kwargs(self) -> dict[str, Any]:
        return {} if self.kv is None else {"kv": self.kv, "kv_budget": self.kv_budget, **dict(self.kv_params)}


KV_MODES = ("aware", "agnostic")


def with_policies(
    configs: list[MethodConfig], kvs: list[str] | None, budgets: list[float] | None,
    kv_sets: dict[str, dict[str, Any]] | None = None, kv_modes: list[str] | None = None,
) -> list[MethodConfig]:
    """Each configuration as given (DynamicCache) plus, for every policy, budget and KV mode, with that
    policy (labels of query-agnostic configurations end in ":agnostic")."""
    from attnsieve.cache import make_policy

    if budgets and not kvs:
        raise ValueError("--kv-budget needs --kv POLICY[,POLICY]")
    modes = kv_modes or ["aware"]
    bad = sorted(set(modes) - set(KV_MODES))
    if bad or not modes:
        raise ValueError(f"--kv-mode must be one or more of {', '.join(KV_MODES)}, got {','.join(modes)!r}")
    if modes != ["aware"] and not kvs:
        raise ValueError("--kv-mode needs --kv POLICY[,POLICY]")
    out = list(configs)
    for kv in kvs or []:
        params = (kv_sets or {}).get(kv, {})
        for b in budgets or [None]:
            make_policy(kv, b, **params)  # validate now, before any model work
            items = tuple(sorted(params.items()))
            extra = f"[{','.join(f'{k}={v}' for k, v in items)}]" if items else ""
            for mode in modes:
                for c in configs:
                    label = f"{c.label}+{kv}{extra}@{b if b is not None else 1.0}"
                    label += "" if mode == "aware" else f":{mode}"
                    out.append(MethodConfig(label, c.method, c.params, kv, b, items, mode))
    return out


def expand_configs(
    methods: list[str], densities: list[float] | None, sets: dict[str, dict[str, Any]]
) -> list[MethodConfig]:
    """One configuration per method, or per density for methods with a density knob."""
    unknown = sorted(set(methods) - set(names()))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(names())}")
    stray = sorted(set(sets) - set(methods))
    if stray:
        raise ValueError(f"--set names method(s) not being run: {', '.join(stray)}")
    for d in densities or []:
        if not 0 < d <= 1:
            raise ValueError(f"density must be in (0, 1], got {d}")
    configs = []
    for name in methods:
        grid = [{"density": d} for d in densities] if densities and has_param(name, "density") else [{}]
        for extra in grid:
            params = {**sets.get(name, {}), **extra}
            make(name, **params)  # validate now, before any model work
            items = tuple(sorted(params.items()))
            label = name if not items else f"{name}[{','.join(f'{k}={v}' for k, v in items)}]"
            configs.append(MethodConfig(label, name, items))
    return configs


def plan_configs(plans: list) -> list[MethodConfig]:
    """One configuration per tuned plan, labelled by its target and model fingerprint."""
    out, seen = [], set()
    for plan in plans:
        label = plan.label()
        if label in seen:
            raise ValueError(f"two plans have the same label {label!r} (same target, same model); run them apart")
        seen.add(label)
        out.append(MethodConfig(label, "plan", (("plan", label),), plan=plan))
    return out


@dataclass
class EvalSpec:
    model: str
    methods: list[str]
    tasks: list[str]
    lengths: list[int]
    samples: int
    out: Path
    densities: list[float] | None = None
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    haystack: str = "repeat"
    seed: int = 0
    command: str = ""
    kv: list[str] | None = None  # KV-cache policies, each run with every method configuration
    kv_budgets: list[float] | None = None
    kv_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    kv_modes: list[str] = field(default_factory=lambda: ["aware"])  # KV_MODES: each policy run in each
    dtype: str = "float32"  # the model's dtype: rows record it, and dense references run in it
    plans: list = field(default_factory=list)  # tuned plans (attnsieve.tune.Plan), each run as one configuration
    backend: str | None = None  # block-sparse kernel backend of every patched configuration (None: auto)

    def __post_init__(self):
        from attnsieve.kernels.block_sparse import check_backend_name

        check_backend_name(self.backend)
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        known = [*TASKS, PPL, RERANK]
        bad = sorted(set(self.tasks) - set(known))
        if bad:
            raise ValueError(f"unknown task(s) {', '.join(bad)}; choose from: {', '.join(known)}")
        if RERANK in self.tasks and (self.kv or self.plans):
            raise ValueError("the rerank task reads one method's attention: it runs no KV policies or plans")
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        for n in self.lengths:
            if n < 64:
                raise ValueError(f"length must be >= 64 tokens, got {n}")
        self.configs = with_policies(
            expand_configs(self.methods, self.densities, self.sets) + plan_configs(self.plans),
            self.kv, self.kv_budgets, self.kv_sets, self.kv_modes,
        )
        if RERANK in self.tasks:
            from attnsieve.signals.rerank import reading_method

            for c in self.configs:  # refused now, before any model work: methods without a support
                reading_method(c.method, **dict(c.params))

    def inputs(self) -> list[tuple[str, int, int]]:
        return [(t, n, i) for t in self.tasks for n in self.lengths for i in range(self.samples)]


def load_rows(path: Path) -> list[dict]:
    """The rows of a results file, one per cell; ValueError naming the file and line for a malformed row."""
    return read_rows(path)


def later_turns(model, tok, sample, first) -> list:
    """The follow-up turns of a multi-turn sample (`meta["turns"]`), each on the previous turn's cache."""
    from attnsieve.eval.generation import next_turn

    out, prev = [], first
    for turn in sample.meta.get("turns", []):
        prev = next_turn(model, tok, prev, encode(tok, turn["question"]), sample.max_new_tokens)
        out.append(prev)
    for t in out:
        t.cache = t.last = None
    return out


def turn_score(sample, turns) -> float:
    """The fraction of a sample's turns answered (one turn: the task's own score)."""
    answers = [sample.answers, *(t["answers"] for t in sample.meta.get("turns", []))]
    return sum(score_contains(t.text, a) for t, a in zip(turns, answers, strict=True)) / len(turns)


def question_tokens(tok, sample) -> int:
    """Tokens of a sample's question, the end of its prompt (what query-agnostic mode holds back)."""
    question = sample.meta.get("question")
    if not question:
        raise ValueError(f"task {sample.task!r} has no separate question: --kv-mode agnostic cannot run it")
    return len(encode(tok, question))


def make_input(tok, spec: EvalSpec, task: str, length: int, i: int):
    """The i-th sample of a task: depths spread evenly over (0, 1), one seed per sample."""
    depth = (i + 0.5) / spec.samples
    if task == PPL:
        ids = haystack_ids(tok, "prose", length, spec.seed + i)
        return None, torch.tensor([ids])
    sample = TASKS[task](tok, length, depth, spec.seed + i, haystack=spec.haystack)
    return sample, sample.input_ids


def evaluate_input(model, tok, spec: EvalSpec, task: str, length: int, i: int,
                   configs: Iterable[MethodConfig], tick: Callable[[str], None] | None = None) -> list[dict]:
    """Run every configuration on one input; returns finished rows (timings from this process)."""
    if task == RERANK:
        return evaluate_rerank(model, tok, spec, length, i, configs, tick)
    sample, ids = make_input(tok, spec, task, length, i)
    ids = ids.to(model.device)
    # stock SDPA timed the way the configurations are: a prefill, or the perplexity forward pass
    stock_s = greedy(model, tok, ids, 0).prefill_s if sample is not None else _timed_ppl(model, ids)[1]
    dtype = next(model.parameters()).dtype
    if str(dtype).removeprefix("torch.") != spec.dtype:
        raise ValueError(f"the model is {dtype} but the evaluation asks for {spec.dtype}")
    info = run_info(spec.seed, dtype, str(model.device))
    if sample is None:
        with patched(model, "dense"):
            dense_ppl = perplexity(model, ids)
        ref = None
    else:
        target = sample.meta.get("target", " " + ", ".join(sample.answers))
        ref = dense_reference(model, ids, encode(tok, target))
    rows, exact_s = [], None
    fidelity_of: dict[tuple, dict] = {}  # a KV policy changes decoding only: prefill fidelity is shared
    for cfg in configs:
        if tick:
            tick(f"{task} {length} #{i}: {cfg.label}")
        # Perplexity scores every token it prefills: a look-ahead estimate would see the tokens it is
        # scored on, so methods with a `causal` switch run leak-free there.
        if cfg.plan is not None:
            method = cfg.layer_methods(force_causal=sample is None)
            forced_causal = sample is None and any(has_param(leaf.method, "causal") for c in cfg.plan.layers.values()
                                                   for leaf in c.leaves())
            spec_kw = {"method": "dense", "layers": method}
        else:
            forced_causal = sample is None and has_param(cfg.method, "causal")
            method = make(cfg.method, **{**dict(cfg.params), "causal": True}) if forced_causal else cfg.make()
            spec_kw = {"method": method}
        with PeakRSS() as mem, patched(model, **spec_kw, **cfg.patch_kwargs(), backend=spec.backend) as p:
            if sample is None:
                ppl, prefill_s = _timed_ppl(model, ids)
                gen = None
            else:
                context = None if cfg.kv_mode == "aware" else ids.shape[1] - question_tokens(tok, sample)
                with AttentionTimer(model) as timer:
                    gen = greedy(model, tok, ids, sample.max_new_tokens, context_len=context, timer=timer)
                prefill_s = gen.prefill_s
                turns = [gen, *later_turns(model, tok, sample, gen)]
                gen.cache = gen.last = None  # the cache is freed with the patch
        if cfg.method == "dense":
            exact_s = prefill_s
        row = {
            "method": cfg.method, "params": dict(cfg.params), "config": cfg.label, "task": task,
            "causal": _is_causal(method), "causal_forced": forced_causal,
            "plan": None if cfg.plan is None else cfg.plan.record(),
            "haystack": "prose" if sample is None else spec.haystack, "length": length, "sample": i,
            "depth": None if sample is None else sample.depth,
            "density": p.stats.density(), "local_density": p.stats.local_density(),
            "skipped_fraction": p.stats.skipped_fraction(),
            "prefill_s": prefill_s, "dense_prefill_s": stock_s, "prefill_ratio": prefill_s / stock_s,
            "estimate_s": p.stats.estimate_s(), "peak_mem_mb": mem.peak_mb,
            "kv": cfg.kv, "kv_budget": cfg.kv_budget, "kv_params": dict(cfg.kv_params),
            "kv_mode": cfg.kv_mode if cfg.kv is not None else None,
        }
        if sample is None:
            row.update(correct=None, ppl=ppl, dense_ppl=dense_ppl, kl=None, top1_agree=None,
                       layer_rel_err={}, mass_covered=None, decode_ms_per_token=None, decode_attn_ms_per_token=None,
                       kv_cache_bytes=None)
        else:
            key = (cfg.method, cfg.params)
            if key not in fidelity_of:
                fidelity_of[key] = method_fidelity(model, method, ref)
            fid = fidelity_of[key]
            row.update(
                correct=turn_score(sample, turns), output=gen.text, answers=sample.answers,
                turn_outputs=[t.text for t in turns[1:]] or None,
                decode_ms_per_token=gen.decode_ms_per_token, decode_attn_ms_per_token=gen.decode_attn_ms_per_token,
                kv_cache_bytes=gen.kv_cache_bytes, **fid,
            )
        rows.append({**row, **info})
    if exact_s is None:  # attnsieve's exact path, timed on this input in this process
        with patched(model, "dense"):
            exact_s = greedy(model, tok, ids, 0).prefill_s if sample is not None else _timed_ppl(model, ids)[1]
    for row in rows:
        row["exact_prefill_s"] = exact_s
        row["exact_ratio"] = row["prefill_s"] / exact_s
    return rows


def evaluate_rerank(model, tok, spec: EvalSpec, length: int, i: int, configs: Iterable[MethodConfig],
                    tick: Callable[[str], None] | None = None) -> list[dict]:
    """The rerank task on one input: ICR under every configuration (its default reading: layers "auto", all
    heads), scored by top-1 (`correct`) and nDCG@10; BM25 and random order on the same passages as fields."""
    from attnsieve.eval.tasks.rerank import bm25_scores, make_rerank, random_order, ranked
    from attnsieve.signals.rerank import ndcg_at_k, rerank

    sample = make_rerank(tok, length, (i + 0.5) / spec.samples, spec.seed + i)
    query, passages, rel = sample.meta["query"], sample.meta["passages"], sample.meta["relevant"]
    dtype = next(model.parameters()).dtype
    if str(dtype).removeprefix("torch.") != spec.dtype:
        raise ValueError(f"the model is {dtype} but the evaluation asks for {spec.dtype}")
    info = run_info(spec.seed, dtype, str(model.device))
    bm25 = ranked(bm25_scores(query, passages))
    rnd = random_order(len(passages), spec.seed + i)
    baselines = {"bm25_correct": float(bm25[0] == rel), "bm25_ndcg10": ndcg_at_k(bm25, [rel]),
                 "random_correct": float(rnd[0] == rel), "random_ndcg10": ndcg_at_k(rnd, [rel])}
    rows = []
    for cfg in configs:
        if tick:
            tick(f"{RERANK} {length} #{i}: {cfg.label}")
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            ranking = rerank(model, tok, query, passages, method=cfg.method, backend=spec.backend, **dict(cfg.params))
            seconds = time.perf_counter() - t0
        order = [j for j, _ in ranking]
        row = {
            "method": cfg.method, "params": dict(cfg.params), "config": cfg.label, "task": RERANK,
            "causal": _is_causal(cfg.make()), "causal_forced": False, "plan": None, "haystack": spec.haystack,
            "length": length, "sample": i, "depth": sample.depth, "prompt_tokens": sample.length,
            "density": ranking.details.density, "local_density": None, "skipped_fraction": None,
            "prefill_s": None, "dense_prefill_s": None, "prefill_ratio": None, "rerank_s": seconds,
            "estimate_s": None, "peak_mem_mb": mem.peak_mb, "kv": None, "kv_budget": None, "kv_params": {},
            "kv_mode": None, "correct": float(order[0] == rel), "ndcg10": ndcg_at_k(order, [rel]),
            "ranking": order, "scores": [s for _, s in ranking], "relevant": rel, "query": query, **baselines,
            "kl": None, "top1_agree": None, "layer_rel_err": {}, "mass_covered": None, "decode_ms_per_token": None,
            "decode_attn_ms_per_token": None, "kv_cache_bytes": None, "exact_prefill_s": None, "exact_ratio": None,
        }
        rows.append({**row, **info})
    return rows


def _is_causal(method) -> bool:
    """Whether every estimate is leak-free: the method's, or each layer's of a plan."""
    methods = method.values() if isinstance(method, dict) else [method]
    return all(bool(getattr(m.params, "causal", True)) for m in methods)


def _timed_ppl(model, ids) -> tuple[float, float]:
    """(perplexity, seconds): the forward pass over the text is this task's prefill."""
    t0 = time.perf_counter()
    ppl = perplexity(model, ids)
    return ppl, time.perf_counter() - t0


def pending_work(spec: EvalSpec, done: set[tuple]) -> list[tuple[tuple[str, int, int], list[MethodConfig]]]:
    work = []
    for task, length, i in spec.inputs():
        hay = "prose" if task == PPL else spec.haystack
        todo = [c for c in spec.configs if (c.label, task, hay, length, i, spec.dtype) not in done]
        if todo:
            work.append(((task, length, i), todo))
    return work


def run_grid(model, tok, spec: EvalSpec, progress: Callable[[str], None] | None = None,
             ray_address: str | None = None) -> list[dict]:
    """Run what is missing from `spec.out/results.jsonl`, write the report, return all rows."""
    with claim(spec.out):
        path = spec.out / RESULTS
        rows = load_rows(path)
        done = {row_key(r) for r in rows}
        work = pending_work(spec, done)

        def keep(new_rows: list[dict]) -> None:
            append_rows(path, new_rows)
            rows.extend(new_rows)

        if ray_address is None:
            for (task, length, i), todo in work:
                keep(evaluate_input(model, tok, spec, task, length, i, todo, progress))
        else:
            from attnsieve.eval.distributed import run_on_ray

            run_on_ray(spec, work, ray_address, keep, progress)
        from attnsieve.eval.report import write_report

        write_report(rows, spec.out, spec.command)
    return rows

