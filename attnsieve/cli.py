"""Command-line interface: thin; parses flags, calls the layers below, prints.

Bad input gives one line on stderr and exit code 2, never a traceback (set ATTNSIEVE_DEBUG=1 to
see the traceback of an unexpected error); a failure of the machine (disk full, a folder that
became read-only) gives one line and exit code 1, Ctrl-C "attnsieve: interrupted" and 130.
Every JSON carries versions, threads and seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from attnsieve.runinfo import run_info

try:  # typer >= 0.20 vendors click; older releases use the click package itself
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover
    from click import exceptions as cx
# Ctrl-C inside a prompt or a progress bar: click's Abort, which vendoring typer defines itself
_ABORT = getattr(cx, "Abort", None) or getattr(typer, "Abort", KeyboardInterrupt)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Training-free efficient attention for pretrained transformers, measured honestly.",
)
err = Console(stderr=True)
out = Console()


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        parsed[key.strip()] = value.strip()
    return parsed


def _print_json(obj: dict, seed: int | None, dtype=None, device: str = "cpu") -> None:
    print(json.dumps({**obj, **run_info(seed, dtype, device)}, default=str))


_DTYPE_HELP = "float32, bfloat16, or auto: bf16 where the CPU has AMX bf16 tiles, float32 elsewhere"


def _dtype(name: str):
    """The torch dtype for --dtype (checked before any model loads)."""
    from attnsieve.precision import resolve_dtype

    return resolve_dtype(name)


_BACKEND_HELP = ("block-sparse kernel backend: auto (the fastest available: the compiled C++ kernel on CPU, flex on "
                 "CUDA), compiled, mkl, flash, matmul, flex (torch.compile'd FlexAttention) or flex-eager (tests only: "
                 "computes the whole score matrix)")
_DEVICE_HELP = "cpu or cuda (cuda:N): where the model and the kernels run"


def _backend(name: str) -> str | None:
    """The patch's backend for --backend (None for auto); an unknown name is a ValueError naming the allowed ones."""
    from attnsieve.kernels.block_sparse import check_backend_name

    check_backend_name(name)
    return None if name == "auto" else name


def _device(name: str):
    """torch.device for --device: a clear one-line error (exit 2) where it cannot run, e.g. cuda without a GPU."""
    from attnsieve.models import resolve_device

    return resolve_device(name)


def _check_backend_runs(backend: str | None, device, dtype) -> None:
    """Refuse, before any model loads, a backend the device / dtype cannot run (e.g. flex without a compiler)."""
    import torch

    from attnsieve.kernels.block_sparse import resolve_backend

    if backend is not None:
        resolve_backend(backend, device, torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)


@app.command("methods")
def methods_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the methods table in Markdown (the docs' table)")]
        = False,
    family: Annotated[str | None, typer.Option(
        help="only this family's methods: exact, sparse, hashing, clustering, lowrank or hybrid")] = None,
    params: Annotated[bool, typer.Option(
        "--params", help="with --markdown: also one parameter table per method (default and meaning)")] = False,
):
    """List the registered attention methods with their families, phases and parameters."""
    from attnsieve.methods import describe, names

    rows = _method_rows(family, describe, names)
    if as_json:
        _print_json({"methods": rows}, None)
        return
    if markdown:
        print(methods_markdown(rows) + ("\n\n" + params_markdown(rows) if params else ""))
        return
    table = Table("method", "family", "phases", "parameters (defaults)")
    for r in rows:
        params_text = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        alias = f" (alias of {r['alias_of']})" if r["alias_of"] else ""
        table.add_row(r["name"] + alias, r["family"], ",".join(r["phases"]), params_text)
    out.print(table)


def _method_rows(family: str | None, describe=None, names=None) -> list[dict]:
    """The registry's method descriptions, all or one family's (a family that does not exist is an error)."""
    if describe is None or names is None:
        from attnsieve.methods import describe, names
    from attnsieve.methods.registry import FAMILIES

    if family is not None and family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return [d for d in (describe(n) for n in names()) if family is None or d["family"] == family]


def methods_markdown(rows: list[dict]) -> str:
    """The methods table (docs and `methods --markdown`), generated from the registry."""
    lines = [
        "| method | family | phases | lookahead | parameters (defaults) | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = ", ".join(f"`{k}={v}`" for k, v in r["params"].items()) or "-"
        alias = f" (alias of `{r['alias_of']}`)" if r["alias_of"] else ""
        ahead = "yes" if r["lookahead"] else "no"
        lines.append(
            f"| `{r['name']}`{alias} | {r['family']} | {', '.join(r['phases'])} | {ahead} | {params} | {r['summary']} |"
        )
    return "\n".join(lines)


def _cell(text: object) -> str:
    """Text for a Markdown table cell: a `|` would end the cell and a `*` start emphasis."""
    return str(text).replace("|", "\\|").replace("*", "\\*")


def params_markdown(rows: list[dict], help_key: str = "param_help") -> str:
    """One Markdown section per method (or policy): its summary and a table of its parameters with their
    defaults and meanings, from the parameter dataclass's field help."""
    parts = []
    for r in rows:
        alias = f" (alias of `{r['alias_of']}`)" if r.get("alias_of") else ""
        lines = [f"### `{r['name']}`", "", f"{_cell(r['summary'])}{alias}", ""]
        if r["params"]:
            lines += ["| parameter | default | meaning |", "|---|---|---|"]
            lines += [f"| `{k}` | `{v}` | {_cell(r[help_key].get(k, '') or '-')} |" for k, v in r["params"].items()]
        else:
            lines.append("No parameters.")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


@app.command("policies")
def policies_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the KV-policy table in Markdown (the docs)")]
        = False,
    params: Annotated[bool, typer.Option(
        "--params", help="with --markdown: also one parameter table per policy (default and meaning)")] = False,
):
    """List the registered KV-cache policies (patch(kv=...), eval --kv, bench decode --kv)."""
    from attnsieve.cache import describe_policy, policy_names

    rows = [describe_policy(n) for n in policy_names()]
    if as_json:
        _print_json({"policies": rows}, None)
        return
    if markdown:
        print(policies_markdown(rows) + ("\n\n" + params_markdown(rows, "help") if params else ""))
        return
    table = Table("policy", "kind (what kv_budget counts)", "parameters (defaults)")
    for r in rows:
        table.add_row(r["name"], r["kind"], ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-")
    out.print(table)


def policies_markdown(rows: list[dict]) -> str:
    """The KV-policy table (docs and `policies --markdown`), generated from the registry."""
    lines = ["| policy | kind | parameters (defaults) | what it does |", "|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"`{k}={v}`" for k, v in r["params"].items()) or "-"
        lines.append(f"| `{r['name']}` | {r['kind']} | {params} | {r['summary']} |")
    return "\n".join(lines)


@app.command("generate")
def generate_cmd(
    method: Annotated[str, typer.Option(help="registered method name (see `attnsieve methods`)")] = "dense",
    model: Annotated[str, typer.Option(help="gemma3-270m, a local HF folder or a .gguf file")] = "gemma3-270m",
    set_: Annotated[list[str] | None, typer.Option("--set", help="method parameter key=value (repeatable)")] = None,
    prompt: Annotated[str | None, typer.Option(help="prompt text")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="file holding the prompt")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate (>= 1)")] = 32,
    kv: Annotated[str | None, typer.Option(help="KV-cache policy for decoding (see `attnsieve policies`)")] = None,
    kv_budget: Annotated[float | None, typer.Option(help="fraction of the dense cache kept, in (0, 1]")] = None,
    plan: Annotated[Path | None, typer.Option(
        help="a plan from `attnsieve tune` (instead of --method/--set): its method per layer")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP)] = "auto",
    backend: Annotated[str, typer.Option(help=_BACKEND_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object last")] = False,
):
    """Generate a greedy continuation with a method (or a tuned plan) patched into the model's attention."""
    from attnsieve.cache import make_policy
    from attnsieve.methods import make, parse_params

    if (prompt is None) == (prompt_file is None):
        raise ValueError("give exactly one of --prompt or --prompt-file")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if prompt_file is not None:
        from attnsieve.tune.calibration import read_text

        prompt = read_text(prompt_file)
    sets = _parse_sets(set_ or [])
    kv_params = {k: v for k, v in sets.items() if k.startswith("kv_")}
    if kv is None and (kv_params or kv_budget is not None):
        raise ValueError("--kv-budget and kv_* parameters need --kv POLICY")
    kv_params = _parse_policy_params(kv, kv_params) if kv else {}
    if kv:
        make_policy(kv, kv_budget, **kv_params)
    params = parse_params(method, {k: v for k, v in sets.items() if not k.startswith("kv_")})
    method_obj = make(method, **params)  # validate before the slow model load
    plan_obj = None
    if plan is not None:
        if method != "dense" or params:
            raise ValueError("give --plan or --method/--set, not both (the plan chooses every layer's method)")
        plan_obj = _plan_for(plan, model)
        method = plan_obj.label()
    dt = _dtype(dtype)
    be, dev = _backend(backend), _device(device)
    _check_backend_runs(be, dev, dt)
    _threads(threads)
    _seed(seed)
    kv_kwargs = {} if kv is None else {"kv": kv, "kv_budget": kv_budget, **kv_params}
    patch_spec = {"plan": plan_obj} if plan_obj is not None else {"method": method_obj}

    from attnsieve.eval.generation import greedy
    from attnsieve.integrations.hf import patched
    from attnsieve.models import load

    with err.status(f"loading {model}"):
        mdl, tok = load(model, dtype=dt, device=dev)
    ids = tok(prompt, return_tensors="pt")
    limit = mdl.config.get_text_config().max_position_embeddings
    if ids.input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({ids.input_ids.shape[1]} tokens) + {max_new_tokens} exceeds the context ({limit})")
    with patched(mdl, **patch_spec, **kv_kwargs, backend=be) as p, err.status(f"generating with {method}"):
        gen = greedy(mdl, tok, ids.input_ids, max_new_tokens)
    summary = p.stats.summary()
    if as_json:
        _print_json(
            {"method": method, "params": params, "plan": None if plan is None else str(plan),
             "prompt_tokens": ids.input_ids.shape[1], "text": gen.text,
             "prefill_s": gen.prefill_s, "decode_s": gen.decode_s, "density": summary["density"],
             "kv": kv, "kv_budget": kv_budget, "kv_params": kv_params, "kv_cache_bytes": gen.kv_cache_bytes,
             "backend": backend},
            seed, dt, str(dev),
        )
    else:
        print(gen.text)
        density = summary["density"]
        err.print(
            f"[dim]{method}: prompt {ids.input_ids.shape[1]} tokens, prefill {gen.prefill_s:.2f} s, "
            f"measured density {density if density is None else round(density, 4)}[/dim]"
        )


@contextlib.contextmanager
def _progress(name: str, total: int, *, calls_start_steps: bool):
    """A progress bar with time estimates on a terminal, one line per step in a log; yields the
    callback `progress(description)`, called as each step starts (or, if not, as each ends)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(name, total=total)
        started = [False]

        def progress(desc: str) -> None:
            if started[0] or not calls_start_steps:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=desc)
            if not err.is_terminal:  # no live bar in a log: one line per step instead
                step = int(bar.tasks[0].completed) + (1 if calls_start_steps else 0)
                print(f"attnsieve {name} [{step}/{total}] {desc}", file=sys.stderr, flush=True)

        yield progress


def _float_list(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} expects comma-separated numbers, got {text!r}") from None


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} expects comma-separated integers, got {text!r}") from None


@app.command("demo")
def demo_cmd(
    model: Annotated[str, typer.Option(help="gemma3-270m, a local HF folder or a .gguf file")] = "gemma3-270m",
    lengths: Annotated[str, typer.Option(help="comma-separated prompt lengths in tokens")] = "2048,4096",
    depths: Annotated[str, typer.Option(help="comma-separated needle depths in [0, 1]")] = "0.25,0.5,0.75",
    density: Annotated[float, typer.Option(help="density for methods that have a density knob")] = 0.1,
    plan: Annotated[list[Path] | None, typer.Option(
        help="a plan from `attnsieve tune`, run as one more row next to the methods (repeatable); rows record it")]
        = None,
    seed: Annotated[int, typer.Option(help="random seed (pass keys, sampling)")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP)] = "auto",
):
    """Pass-key retrieval on the embedded model: dense, window and block-topk (and tuned plans) side by side."""
    from attnsieve.eval.demo import DemoConfig

    lens = _int_list(lengths, "--lengths")
    cfg = DemoConfig(lengths=lens, depths=_float_list(depths, "--depths"), density=density, seed=seed,
                     plans=[_plan_for(p, model) for p in plan or []])
    dt = _dtype(dtype)
    _threads(threads)
    _seed(seed)

    from attnsieve.eval.demo import run_demo
    from attnsieve.models import load

    with err.status(f"loading {model} ({str(dt).removeprefix('torch.')})"):
        mdl, tok = load(model, dtype=dt)
    steps = len(cfg.lengths) * len(cfg.depths) * (1 + len(cfg.methods) + len(cfg.plans))
    with _progress("demo", steps, calls_start_steps=True) as progress:
        rows = run_demo(mdl, tok, cfg, progress)
    table = Table("method", "length", "accuracy", "measured density", "prefill vs SDPA",
                  title=f"pass-key retrieval ({str(dt).removeprefix('torch.')})")
    for r in rows:
        table.add_row(r["config"], str(r["length"]), f"{r['accuracy']:.2f}", f"{r['density']:.3f}",
                      f"{r['prefill_ratio']:.2f}x")
    out.print(table)
    _print_json({"command": "demo", "model": model, "rows": rows}, seed, dt)


def _parse_method_sets(pairs: list[str]) -> dict[str, dict[str, str]]:
    """`--set method.key=value` pairs grouped by method."""
    grouped: dict[str, dict[str, str]] = {}
    for key, value in _parse_sets(pairs).items():
        method, dot, param = key.partition(".")
        if not dot or not method or not param:
            raise ValueError(f"--set expects method.key=value for commands that run several methods, got {key!r}")
        grouped.setdefault(method, {})[param] = value
    return grouped


def _model_context(model: str) -> int:
    """The model's context length, read from its config without loading weights."""
    from transformers import AutoConfig

    from attnsieve.models import resolve

    cfg = AutoConfig.from_pretrained(resolve(model), local_files_only=True)
    return cfg.get_text_config().max_position_embeddings


def _plan_for(path: Path, model: str):
    """A plan file, validated and checked against the model's config before any weights load."""
    from transformers import AutoConfig

    from attnsieve.models import resolve
    from attnsieve.tune.plan import load_plan

    plan = load_plan(path)
    plan.check_model(AutoConfig.from_pretrained(resolve(model), local_files_only=True))
    return plan


@app.command("eval")
def eval_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="output folder: results.jsonl, summary.csv, report.md, plots")],
    model: Annotated[str, typer.Option(help="gemma3-270m, a local HF folder or a .gguf file")] = "gemma3-270m",
    methods: Annotated[str, typer.Option(help="comma-separated method names")] = "dense,window,block-topk",
    tasks: Annotated[str, typer.Option(help="comma-separated tasks (see docs; ppl = perplexity, rerank = attention "
                                          "re-ranking)")] = "passkey",
    lengths: Annotated[str, typer.Option(help="comma-separated prompt lengths in tokens")] = "2048",
    samples: Annotated[int, typer.Option(help="samples per task and length (needle depths spread evenly)")] = 2,
    density: Annotated[str | None, typer.Option(help="comma-separated densities (methods with a density knob)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="method.key=value (repeatable)")] = None,
    haystack: Annotated[str, typer.Option(help="haystack for needle tasks: repeat or prose")] = "repeat",
    seed: Annotated[int, typer.Option(help="random seed (task generation)")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    ray: Annotated[str | None, typer.Option("--ray", help="Ray address, 'auto', or 'local' (ray extra)")] = None,
    kv: Annotated[str | None, typer.Option(help="comma-separated KV-cache policies, each with every method")] = None,
    kv_budget: Annotated[str | None, typer.Option(help="comma-separated KV budgets in (0, 1] for --kv")] = None,
    kv_mode: Annotated[str, typer.Option(
        help="comma-separated: aware (the policy compresses the prompt with its question) and/or agnostic (the "
             "context alone is compressed, then the question is appended to the frozen cache)")] = "aware",
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP + "; rows record it, fidelity is against dense "
                                            "in the same dtype")] = "auto",
    plan: Annotated[list[Path] | None, typer.Option(
        help="a plan from `attnsieve tune`, run as one more configuration (repeatable); rows record it")] = None,
    backend: Annotated[str, typer.Option(help=_BACKEND_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "cpu",
):
    """Evaluate methods (and tuned plans) on long-context tasks: accuracy, fidelity to dense, time and memory."""
    from attnsieve.eval.runner import EvalSpec
    from attnsieve.eval.tasks import HAYSTACKS
    from attnsieve.methods import parse_params

    if haystack not in HAYSTACKS:
        raise ValueError(f"--haystack must be one of {', '.join(HAYSTACKS)}, got {haystack!r}")
    lens = _int_list(lengths, "--lengths")
    from attnsieve.cache import policy_names

    kvs = [x.strip() for x in kv.split(",") if x.strip()] if kv else None
    raw_sets = _parse_method_sets(set_ or [])
    kv_sets = {n: _parse_policy_params(n, raw_sets.pop(n)) for n in list(raw_sets) if n in policy_names()}
    stray = sorted(set(kv_sets) - set(kvs or []))
    if stray:
        raise ValueError(f"--set names KV polic(ies) not being run: {', '.join(stray)}")
    sets = {m: parse_params(m, vals) for m, vals in raw_sets.items()}
    spec = EvalSpec(
        model=model, methods=[m.strip() for m in methods.split(",") if m.strip()],
        tasks=[t.strip() for t in tasks.split(",") if t.strip()], lengths=lens, samples=samples, out=out_dir,
        densities=_float_list(density, "--density") if density else None, sets=sets, haystack=haystack,
        seed=seed, command="attnsieve " + " ".join(sys.argv[1:]), kv=kvs,
        kv_budgets=_float_list(kv_budget, "--kv-budget") if kv_budget else None, kv_sets=kv_sets,
        kv_modes=[x.strip() for x in kv_mode.split(",") if x.strip()],
        dtype=str(_dtype(dtype)).removeprefix("torch."),
        plans=[_plan_for(p, model) for p in plan or []], backend=_backend(backend),
    )
    dev = _device(device)
    if ray is not None and dev.type != "cpu":
        raise ValueError("--device cuda runs in-process; leave out --ray")
    _check_backend_runs(spec.backend, dev, _dtype(spec.dtype))
    from attnsieve.eval.results import claim

    with claim(out_dir):  # checked and held before the model loads: a second run on it is refused
        limit = _model_context(model)
        for n in lens:
            if n > limit:
                raise ValueError(f"length {n} is beyond the model's context ({limit} tokens)")
        _threads(threads)
        _seed(seed)

        from attnsieve.eval.runner import load_rows, pending_work, row_key, run_grid
        from attnsieve.models import load

        done = {row_key(r) for r in load_rows(out_dir / "results.jsonl")}
        work = pending_work(spec, done)
        steps = sum(len(todo) for _, todo in work) if ray is None else len(work)
        mdl, tok = (None, None)
        if ray is None and work:
            with err.status(f"loading {model} ({spec.dtype})"):
                mdl, tok = load(model, dtype=spec.dtype, device=dev)
        # in-process the runner reports each step as it starts; on Ray each input as it finishes
        with _progress("eval", steps, calls_start_steps=ray is None) as progress:
            if tok is None:
                from transformers import AutoTokenizer

                from attnsieve.models import resolve

                tok = AutoTokenizer.from_pretrained(resolve(model), local_files_only=True)
            rows = run_grid(mdl, tok, spec, progress, ray_address=ray)
    err.print(f"{len(work)} input(s) evaluated, {len(done)} row(s) reused; report: {out_dir / 'report.md'}")
    _print_json({"command": "eval", "out": str(out_dir), "rows": len(rows), "computed_inputs": len(work)}, seed,
                spec.dtype, str(dev))


def _read_docs(path: Path) -> tuple[list, list[str]]:
    """(ids, texts) of a JSONL file whose every line is an object with `id` and `text` (blank lines skipped)."""
    if not path.is_file():
        raise ValueError(f"--docs {path} is not a file")
    ids, texts = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--docs {path} line {n} is not JSON ({e.msg})") from None
            if not isinstance(doc, dict) or "id" not in doc or not isinstance(doc.get("text"), str):
                raise ValueError(f"--docs {path} line {n} must be an object with 'id' and a string 'text'")
            if not doc["text"].strip():
                raise ValueError(f"--docs {path} line {n} (id {doc['id']!r}) has an empty text")
            if doc["id"] in ids:
                raise ValueError(f"--docs {path} line {n} repeats id {doc['id']!r}")
            ids.append(doc["id"])
            texts.append(doc["text"])
    if not texts:
        raise ValueError(f"--docs {path} holds no documents")
    return ids, texts


@app.command("rerank")
def rerank_cmd(
    query: Annotated[str, typer.Option(help="the query the documents are ranked for")],
    docs: Annotated[Path, typer.Option(help="JSONL file, one object per line with 'id' and 'text'")],
    model: Annotated[str, typer.Option(help="gemma3-270m, a local HF folder or a .gguf file")] = "gemma3-270m",
    top: Annotated[int | None, typer.Option(help="print only the K best documents")] = None,
    heads: Annotated[str, typer.Option(
        help="all, or retrieval: the top 10% of the read layers' heads by retrieval score (head profiles at 1024 "
             "tokens, computed once per model and cached)")] = "all",
    layers: Annotated[str, typer.Option(
        help="auto (global layers on models that also have sliding-window ones, else all), all, global, sliding, "
             "or comma-separated layer indices")] = "auto",
    method: Annotated[str, typer.Option(help="dense or a sparse method with a support, run in the global layers; "
                                             "its attention is the one read")] = "dense",
    density: Annotated[float | None, typer.Option(help="the method's density, in (0, 1]")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="method parameter key=value (repeatable)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object last")] = False,
):
    """Rank documents for a query by the attention the query puts on them (ICR, Chen et al. 2025)."""
    from attnsieve.methods import parse_params
    from attnsieve.signals.rerank import HEAD_CHOICES, LAYER_CHOICES, reading_method

    if not query.strip():
        raise ValueError("--query is empty")
    if top is not None and top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    if heads not in HEAD_CHOICES:
        raise ValueError(f"--heads must be one of {', '.join(HEAD_CHOICES)}, got {heads!r}")
    if layers in LAYER_CHOICES:
        layer_spec = layers
    else:
        layer_spec = _int_list(layers, "--layers")
    params = parse_params(method, _parse_sets(set_ or []))
    if density is not None:
        params["density"] = density
    reading_method(method, **params)  # an unknown method, a bad parameter or one without a support: before loading
    ids, texts = _read_docs(docs)
    dt = _dtype(dtype)
    _threads(threads)
    _seed(seed)

    from attnsieve.models import load
    from attnsieve.signals.rerank import rerank

    with err.status(f"loading {model}"):
        mdl, tok = load(model, dtype=dt)
    with err.status(f"reranking {len(texts)} documents"):
        ranking = rerank(mdl, tok, query, dict(zip(ids, texts, strict=True)), heads=heads, layers=layer_spec,
                         method=method, **params)
    shown = list(ranking)[: top or len(ranking)]
    if as_json:
        d = ranking.details
        _print_json({"command": "rerank", "query": query, "ranking": [{"id": i, "score": s} for i, s in shown],
                     "method": d.method, "params": d.params, "density": d.density, "layers": sorted({li for li, _ in
                     d.selected}), "heads": heads, "prompt_tokens": d.prompt_tokens}, seed, dt)
        return
    text_of = dict(zip(ids, texts, strict=True))
    table = Table(title=f"ICR ranking ({ranking.details.method}, {len(texts)} documents)")
    for col in ("rank", "id", "score", "text"):
        table.add_column(col)
    for rank, (i, s) in enumerate(shown, 1):
        t = " ".join(text_of[i].split())
        table.add_row(str(rank), str(i), f"{s:.4g}", t[:60] + ("..." if len(t) > 60 else ""))
    out.print(table)


@app.command("tune")
def tune_cmd(
    out_file: Annotated[Path, typer.Option("--out", help="the plan file to write (JSON)")],
    model: Annotated[str, typer.Option(help="gemma3-270m, a local HF folder or a .gguf file")] = "gemma3-270m",
    target_kl: Annotated[float | None, typer.Option(
        help="mean KL(dense || plan) over the calibration answers, at most this (nats)")] = None,
    target_top1: Annotated[float | None, typer.Option(
        help="top-1 agreement with dense over the calibration answers, at least this, in (0, 1]")] = None,
    target_layer_error: Annotated[float | None, typer.Option(
        help="every replaced layer's mean relative output error, at most this (the prompt's last 64 "
             "query rows weigh as much as all rows; see attnsieve.tune.profile)")] = None,
    methods: Annotated[str, typer.Option(help="comma-separated candidate methods (dense is always one)")] =
        "block-topk,window",
    density: Annotated[str, typer.Option(help="comma-separated densities (methods with a density knob)")] =
        "0.05,0.1,0.2,0.3,0.5,0.7",
    set_: Annotated[list[str] | None, typer.Option("--set", help="method.key=value (repeatable)")] = None,
    lengths: Annotated[str, typer.Option(help="comma-separated calibration prompt lengths in tokens")] = "4096",
    tasks: Annotated[str | None, typer.Option(
        help="comma-separated calibration tasks (default passkey,niah_single; none with --prompt-file alone)")] = None,
    calib: Annotated[int, typer.Option(help="calibration prompts per length from the tasks (seeds eval never uses); "
                                            "4 by default: with 2, plans fitted to them failed held out")]
        = 4,
    haystack: Annotated[str, typer.Option(help="haystack of the calibration task prompts: repeat or prose")] =
        "prose",
    prompt_file: Annotated[list[Path] | None, typer.Option(
        help="a text file as calibration (its first LENGTH tokens, the next 16 as the answer); repeatable")] = None,
    objective: Annotated[str, typer.Option(help="minimise measured attention time, or measured density")] = "time",
    granularity: Annotated[str, typer.Option(
        help="what one choice covers: head (each query head of a layer its own method and budget: dense, "
             "window or a method at a density) or layer")] = "head",
    max_verify: Annotated[int, typer.Option(help="most plans verified with full forwards on the calibration set")] = 6,
    uniform_check: Annotated[bool, typer.Option(
        "--uniform-check/--no-uniform-check",
        help="also verify, per method, the cheapest uniform configuration (one candidate on every head or layer) "
             "cheaper than the searched plan that meets the target, and keep it if it passes")] = True,
    max_uniform_verify: Annotated[int, typer.Option(
        help="verifications the uniform check may spend per candidate method (bisection)")] = 3,
    reps: Annotated[int | None, typer.Option(
        help="timed repetitions of each profiled call (median; default 3 with --objective time, else 1)")] = None,
    validate: Annotated[bool, typer.Option(
        "--validate", help="also measure the plan on held-out prompts (eval's seeds and depths, the other "
                           "haystack) against dense and every candidate applied uniformly, and plot the frontier; "
                           "writes <out stem>.validation.json/.md and .frontier.png (costs full runs)")] = False,
    validate_samples: Annotated[int, typer.Option(
        help="held-out prompts per task and length for --validate (as eval's --samples; accuracy claims "
             "rest on at least 5)")] = 5,
    seed: Annotated[int, typer.Option(help="random seed (calibration prompts; held-out ones use eval's)")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", help="Ray address, 'auto', or 'local' (ray extra): dense references, profiling, verification and "
                      "validation run on workers, one model and one thread each, prompts split among them")] = None,
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP)] = "auto",
):
    """Tune a per-head (or per-layer) plan: the cheapest configuration within a target of exact attention."""
    from attnsieve.eval.tasks import HAYSTACKS
    from attnsieve.methods import parse_params
    from attnsieve.tune.calibration import read_text
    from attnsieve.tune.plan import Target
    from attnsieve.tune.profile import candidates_for
    from attnsieve.tune.tuner import TuneSpec

    given = {k: v for k, v in (("kl", target_kl), ("top1", target_top1), ("layer_error", target_layer_error))
             if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of --target-kl, --target-top1 or --target-layer-error")
    ((kind, value),) = given.items()
    target = Target(kind, value)
    lens = _int_list(lengths, "--lengths")
    if not lens:
        raise ValueError("--lengths is empty")
    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if tasks is None and not prompt_file:
        task_list = ["passkey", "niah_single"]
    if tasks is not None and not task_list:
        raise ValueError("--tasks is empty")
    if calib < 1:
        raise ValueError(f"--calib must be >= 1, got {calib}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"--haystack must be one of {', '.join(HAYSTACKS)}, got {haystack!r}")
    from attnsieve.eval.tasks import TASKS

    bad = sorted(set(task_list) - set(TASKS))
    if bad:
        raise ValueError(f"unknown calibration task(s) {', '.join(bad)}; choose from: {', '.join(TASKS)}")
    for f in prompt_file or []:
        read_text(f)
    if validate_samples < 1:
        raise ValueError(f"--validate-samples must be >= 1, got {validate_samples}")
    raw_sets = _parse_method_sets(set_ or [])
    sets = {m: parse_params(m, vals) for m, vals in raw_sets.items()}
    candidates = candidates_for([m.strip() for m in methods.split(",") if m.strip()], _float_list(density, "--density"),
                                sets)
    spec = TuneSpec(target, candidates, objective=objective, granularity=granularity, max_verify=max_verify, reps=reps,
                    uniform_check=uniform_check, max_uniform_verify=max_uniform_verify,
                    model=model, seed=seed,
                    extra={"command": "attnsieve " + " ".join(sys.argv[1:])})
    if out_file.is_dir():
        raise ValueError(f"--out {str(out_file)!r} is a folder; it must name the plan file to write")
    parent = out_file.parent if str(out_file.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--out {str(out_file)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {str(out_file)!r}: folder {str(parent)!r} is not writable")
    limit = _model_context(model)
    for n in lens:
        if not 64 <= n <= limit:
            raise ValueError(f"--lengths: each length must be in [64, {limit}] for this model, got {n}")
    dt = _dtype(dtype)
    _threads(threads)
    _seed(seed)

    from attnsieve.models import load
    from attnsieve.tune.calibration import file_prompts, task_prompts
    from attnsieve.tune.tuner import tune

    pool = None
    if ray is None:
        with err.status(f"loading {model} ({str(dt).removeprefix('torch.')})"):
            mdl, tok = load(model, dtype=dt)
    else:  # the workers load the model; here only its tokenizer and config
        from transformers import AutoTokenizer

        from attnsieve.models import resolve
        from attnsieve.tune.distributed import RayPool

        mdl, tok = None, AutoTokenizer.from_pretrained(resolve(model), local_files_only=True)
        pool = RayPool(ray, model, str(dt).removeprefix("torch."))
    prompts = (task_prompts(tok, task_list, lens, calib, haystack, seed) if task_list else []) + \
        file_prompts(tok, list(prompt_file or []), lens)
    validation = None
    if validate:
        from attnsieve.tune.calibration import heldout_prompts, other_haystack
        from attnsieve.tune.validate import ValidationSpec

        validation = ValidationSpec(tok, heldout_prompts(tok, task_list or ["passkey", "niah_single"], lens,
                                                         validate_samples, other_haystack(haystack), seed))
    try:
        with _tune_progress() as progress:
            plan, report = tune(mdl, prompts, spec, progress, validation, pool)
    finally:
        if pool is not None:
            pool.close()
    plan.save(out_file)
    files = None
    if validation is not None:
        from attnsieve.tune import report as tune_report

        files = tune_report.write(report["validation"], out_file, plan.label(), run_info(seed, dt))
    out.print(_plan_table(plan, report, f"plan for {model} ({target.kind} {'>=' if kind == 'top1' else '<='} "
                                       f"{value:g}, objective {objective}, per {granularity})"))
    ff = report["full_forwards"]
    err.print(f"verified on {len(prompts)} calibration prompt(s): KL {plan.kl:.4g}, top-1 {plan.top1:.3f}, measured "
              f"density {plan.measured_density:.3f}, attention time ratio {plan.time_ratio:.3f}; "
              f"{ff['total']} full forwards ({ff['dense_reference']} dense, {ff['probe']} probes, {ff['verify']} "
              f"verification), {report['seconds']:.0f} s; plan: {out_file}")
    summary = None
    if files is not None:
        v = report["validation"]
        best, mine = v["best_uniform"], v["plan"]
        err.print(f"held-out ({v['prompts']['prompts']} prompts): plan KL {mine['kl']:.4g}, accuracy "
                  f"{mine['accuracy']:.2f} (dense {v['dense']['accuracy']:.2f}), density "
                  f"{mine['measured_density']:.3f}; "
                  f"best uniform of equal or better KL: {best['config']} (KL {best['kl']:.4g}, density "
                  f"{best['measured_density']:.3f}); report: {files['markdown']}, plot: {files['plot']}")
        summary = {k: v[k] for k in ("dense", "plan", "best_uniform", "cost_vs_best_uniform", "accuracy_vs_dense",
                                     "full_forwards")}
        summary["files"] = {k: str(p) for k, p in files.items()}
    _print_json({"command": "tune", "model": model, "out": str(out_file), "target": target.to_json(),
                 "kl": plan.kl, "top1": plan.top1, "measured_density": plan.measured_density,
                 "time_ratio": plan.time_ratio, "prefill_ratio": report["prefill_ratio"],
                 "granularity": granularity, "ray": ray,
                 "layers": {str(i): c.to_json() for i, c in sorted(plan.layers.items())},
                 "full_forwards": ff, "seconds": report["seconds"], "phase_seconds": report["phase_seconds"],
                 "validation": summary}, seed, dt)


def _plan_table(plan, report: dict, title: str) -> Table:
    """One row per layer (a per-head layer: one row per head) with its error and density."""
    table = Table("layer", "head", "method", "params", "layer rel. error", "layer density", title=title)
    for idx, choice in sorted(plan.layers.items()):
        err_, dens = report["layer_rel_err"][str(idx)], report["layer_density"][str(idx)]
        for h, leaf in enumerate(choice.leaves()):
            table.add_row(str(idx) if h == 0 else "", "all" if choice.heads is None else str(h), leaf.method,
                          ", ".join(f"{k}={v}" for k, v in leaf.params.items()) or "-",
                          f"{err_:.3g}" if h == 0 else "", f"{dens:.3f}" if h == 0 else "")
    return table


@contextlib.contextmanager
def _tune_progress():
    """A progress bar whose total grows as the search learns how many verifications it needs."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("tune", total=1)

        def progress(desc: str, done: int, total: int) -> None:
            bar.update(task, description=desc, completed=done, total=max(total, done + 1))
            if not err.is_terminal:
                print(f"attnsieve tune [{done + 1}/{max(total, done + 1)}] {desc}", file=sys.stderr, flush=True)

        yield progress


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: timings as ratios measured in the same run.")
app.add_typer(bench_app, name="bench")


@bench_app.command("kernel")
def bench_kernel_cmd(
    length: Annotated[int, typer.Option(help="sequence length in tokens")] = 16384,
    density: Annotated[float, typer.Option(help="target density in (0, 1]")] = 0.1,
    heads: Annotated[int, typer.Option(help="query heads")] = 4,
    kv_heads: Annotated[int, typer.Option(help="key/value heads")] = 1,
    head_dim: Annotated[int, typer.Option(help="head dimension")] = 256,
    method: Annotated[str, typer.Option(help="sparse method whose support is executed")] = "block-topk",
    reps: Annotated[int, typer.Option(help="timed repetitions (median) after one warm-up")] = 3,
    seed: Annotated[int, typer.Option(help="random seed of the inputs")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    backend: Annotated[str, typer.Option(help=_BACKEND_HELP + "; with flex on CPU the compiled C++ kernel runs "
                                          "the same support in the same run")] = "auto",
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP + " (SDPA runs in the same dtype)")] = "float32",
    device: Annotated[str, typer.Option(help=_DEVICE_HELP + " (on cuda SDPA runs FlashAttention)")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON line")] = False,
):
    """Causal SDPA against support estimation + the block-sparse kernel, random inputs, one dtype."""
    from attnsieve.eval.bench import bench_kernel

    if not 0 < density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {density}")
    dt = _dtype(dtype)
    be, dev = _backend(backend), _device(device)
    _check_backend_runs(be, dev, dt)
    _threads(threads)
    with err.status(f"timing {method} at {length} tokens"):
        r = bench_kernel(length, density, heads=heads, kv_heads=kv_heads, head_dim=head_dim, method=method,
                         reps=reps, seed=seed, backend=be, dtype=dt, device=dev)
    if not as_json:
        table = Table("shape", "dtype", "path", "SDPA s", "estimate s", "sparse s", "speed-up", "kernel speed-up",
                      "estimate / sparse", "density")
        table.add_row(f"H{heads}/{kv_heads} D{head_dim} T{length}", r["dtype"], r["kernel_path"], f"{r['dense_s']:.3f}",
                      f"{r['estimate_s']:.3f}", f"{r['sparse_s']:.3f}", f"{r['speedup']:.2f}x",
                      f"{r['kernel_speedup']:.2f}x", f"{r['estimate_share']:.0%}", f"{r['measured_density']:.3f}")
        out.print(table)
        err.print(f"[dim]path: {r['kernel_path']} ({r['why']})[/dim]")
        if "compiled_s" in r:
            err.print(f"[dim]same support on the compiled C++ kernel: {r['compiled_s']:.3f} s; flex is "
                      f"{r['flex_vs_compiled']:.2f}x its speed[/dim]")
    _print_json({"command": "bench kernel", **r}, seed, dt, str(dev))


@bench_app.command("prefill")
def bench_prefill_cmd(
    model: Annotated[str, typer.Option(help="gemma3-270m, a local HF folder or a .gguf file")] = "gemma3-270m",
    method: Annotated[str | None, typer.Option(help="registered method name (default block-topk)")] = None,
    plan: Annotated[Path | None, typer.Option(
        help="a plan from `attnsieve tune`, timed instead of --method (rows record it)")] = None,
    length: Annotated[int | None, typer.Option(help="one prompt length in tokens (default 4096)")] = None,
    lengths: Annotated[str | None, typer.Option(
        help="comma-separated prompt lengths (instead of --length): one row per length and dtype")] = None,
    density: Annotated[float | None, typer.Option(
        help="density, for methods with a density knob (default 0.1)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="method parameter key=value (repeatable)")] = None,
    reps: Annotated[int, typer.Option(help="timed repetitions (median) after a short warm-up")] = 1,
    seed: Annotated[int, typer.Option(help="random seed of the prompt")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    dtype: Annotated[str, typer.Option(
        help=_DTYPE_HELP + "; a comma-separated list (float32,bfloat16) runs each; SDPA runs in the same "
             "dtype")] = "float32",
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="folder for prefill.jsonl (the rows) and prefill.png (time against length, per dtype)")] = None,
    backend: Annotated[str, typer.Option(help=_BACKEND_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON line")] = False,
):
    """End-to-end prefill of a real model: the method (or a tuned plan) against stock SDPA and the exact path."""
    from attnsieve.eval.bench import bench_prefill
    from attnsieve.methods import has_param, make, parse_params

    if plan is not None and (method is not None or density is not None or set_):
        raise ValueError("give --plan or --method/--density/--set, not both (the plan chooses every layer's method)")
    plan_obj = None if plan is None else _plan_for(plan, model)
    method = method or "block-topk"
    label = method if plan_obj is None else plan_obj.label()
    params = parse_params(method, _parse_sets(set_ or []))
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"--density must be in (0, 1], got {density}")
    if has_param(method, "density") and plan is None:
        params.setdefault("density", 0.1 if density is None else density)
    make(method, **params)
    if length is not None and lengths is not None:
        raise ValueError("give --length or --lengths, not both")
    if lengths is not None:
        lens = _int_list(lengths, "--lengths")
        if not lens:
            raise ValueError("--lengths is empty")
    else:
        lens = [4096 if length is None else length]
    limit = _model_context(model)
    for n in lens:
        if not 64 <= n <= limit:
            raise ValueError(f"--length must be in [64, {limit}] for this model, got {n}")
    dts = list(dict.fromkeys(_dtype(d.strip()) for d in dtype.split(",") if d.strip()))
    if not dts:
        raise ValueError("--dtype is empty")
    be, dev = _backend(backend), _device(device)
    for dt in dts:
        _check_backend_runs(be, dev, dt)
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {str(out_dir)!r} is a file, not a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise ValueError(f"--out {str(out_dir)!r} is not writable")
    _threads(threads)

    from attnsieve.models import load

    rows = []
    for dt in dts:
        name = str(dt).removeprefix("torch.")
        with err.status(f"loading {model} ({name})"):
            mdl, tok = load(model, dtype=dt, device=dev)
        for n in lens:
            with err.status(f"timing prefill at {n} tokens in {name}: SDPA, exact path, {label}"):
                r = bench_prefill(mdl, tok, method, n, params=params, reps=reps, seed=seed, plan=plan_obj,
                                  backend=be)
            rows.append({"command": "bench prefill", "model": model, "backend": backend, **r})
            if out_dir is not None:
                from attnsieve.runinfo import run_info

                with (out_dir / "prefill.jsonl").open("a") as f:
                    f.write(json.dumps({**rows[-1], **run_info(seed, dt, str(dev))}, default=str) + "\n")
        del mdl
    if not as_json:
        table = Table("length", "dtype", "SDPA s", "exact s", f"{label} s", "speed-up", "exact speed-up", "density")
        for r in rows:
            table.add_row(str(r["length"]), r["dtype"], f"{r['dense_s']:.2f}", f"{r['exact_s']:.2f}", f"{r['s']:.2f}",
                          f"{r['speedup']:.2f}x", f"{r['exact_speedup']:.2f}x", f"{r['density']:.3f}")
        out.print(table)
        err.print(f"[dim]path: {rows[-1]['kernel_path']} ({rows[-1]['why']})[/dim]")
    if out_dir is not None:
        from attnsieve.eval.bench import plot_prefill

        plot_prefill(rows, out_dir / "prefill.png")
        err.print(f"rows: {out_dir / 'prefill.jsonl'}, plot: {out_dir / 'prefill.png'}")
    if len(rows) == 1:  # one length, one dtype: the single-row JSON of earlier releases
        _print_json(rows[0], seed, dts[0], str(dev))
    else:
        _print_json({"command": "bench prefill", "model": model, "rows": rows}, seed,
                    ",".join(str(d).removeprefix("torch.") for d in dts), str(dev))


@bench_app.command("decode")
def bench_decode_cmd(
    model: Annotated[str, typer.Option(help="gemma3-270m, a local HF folder or a .gguf file")] = "gemma3-270m",
    kv: Annotated[str, typer.Option(help="KV-cache policy (attnsieve policies lists them)")] = "snapkv",
    kv_budget: Annotated[float | None, typer.Option(help="fraction of the dense cache kept, in (0, 1]")] = 0.25,
    length: Annotated[int, typer.Option(help="prompt length in tokens")] = 4096,
    steps: Annotated[int, typer.Option(help="decoding steps timed after the prefill")] = 32,
    rounds: Annotated[int, typer.Option(
        help="alternating blocks the steps run in (DynamicCache, then the policy; medians over blocks)")] = 4,
    method: Annotated[str, typer.Option(help="prefill method (registered name)")] = "dense",
    set_: Annotated[list[str] | None, typer.Option("--set", help="method or policy parameter key=value")] = None,
    seed: Annotated[int, typer.Option(help="random seed of the prompt")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP)] = "float32",
    backend: Annotated[str, typer.Option(help=_BACKEND_HELP)] = "auto",
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON line")] = False,
):
    """Decoding with a KV-cache policy against transformers' DynamicCache: ms per step and cache bytes."""
    from attnsieve.cache import make_policy
    from attnsieve.eval.bench import bench_decode
    from attnsieve.methods import make, parse_params

    sets = _parse_sets(set_ or [])
    kv_sets = {k: v for k, v in sets.items() if k.startswith("kv_")}
    params = parse_params(method, {k: v for k, v in sets.items() if not k.startswith("kv_")})
    make(method, **params)
    kv_params = _parse_policy_params(kv, kv_sets)
    make_policy(kv, kv_budget, **kv_params)
    limit = _model_context(model)
    if not 64 <= length <= limit:
        raise ValueError(f"--length must be in [64, {limit}] for this model, got {length}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    dt = _dtype(dtype)
    be, dev = _backend(backend), _device(device)
    _check_backend_runs(be, dev, dt)
    _threads(threads)

    from attnsieve.models import load

    with err.status(f"loading {model}"):
        mdl, tok = load(model, dtype=dt, device=dev)
    with err.status(f"prefill {length} tokens, then {steps} steps in {rounds} alternating blocks: "
                    f"DynamicCache and {kv}"):
        r = bench_decode(mdl, tok, kv, kv_budget, length, steps=steps, method=method,
                         params={**params, **kv_params}, seed=seed, rounds=rounds, backend=be)
    if not as_json:
        table = Table("policy", "budget", "dense ms/step", "ms/step", "dense attn ms", "attn ms",
                      "dense global-layer attn ms", "global-layer attn ms", "dense MB", "MB", "compressed layers",
                      "tokens agree")
        table.add_row(kv, str(kv_budget), f"{r['dense_ms']:.1f}", f"{r['ms']:.1f}", f"{r['dense_attn_ms']:.1f}",
                      f"{r['attn_ms']:.1f}", f"{r['dense_global_attn_ms']:.2f}", f"{r['global_attn_ms']:.2f}",
                      f"{r['dense_bytes'] / 2**20:.1f}", f"{r['bytes'] / 2**20:.1f}",
                      f"{r['compressed_layers_ratio']:.3f}x", f"{r['token_agreement']:.2f}")
        out.print(table)
    _print_json({"command": "bench decode", "model": model, **r}, seed, dt, str(dev))


def cli_markdown() -> str:
    """The command-line reference in Markdown, read from the parser itself: every command's usage, its help
    and its options with their defaults, as `attnsieve COMMAND --help` prints them."""
    root = typer.main.get_command(app)
    parts = []

    def walk(cmd, ctx, path: str) -> None:
        subcommands = getattr(cmd, "commands", None)
        if subcommands:  # a group (attnsieve, attnsieve bench): its commands, in their declared order
            for name, sub in subcommands.items():
                walk(sub, sub.context_class(sub, info_name=name, parent=ctx), f"{path} {name}")
            return
        lines = [f"## `{path}`", "", _cell((cmd.help or "").strip()), "", "```", cmd.get_usage(ctx), "```", ""]
        records = [p.get_help_record(ctx) for p in cmd.get_params(ctx)]
        lines += ["| option | meaning |", "|---|---|"]
        lines += [f"| `{opts}` | {_cell(text)} |" for opts, text in filter(None, records)]
        parts.append("\n".join(lines))

    walk(root, root.context_class(root, info_name="attnsieve"), "attnsieve")
    return "\n\n".join(parts)


def _parse_policy_params(kv: str, raw: dict[str, str]) -> dict:
    """Typed policy parameters from --set kv_key=value strings."""
    import dataclasses

    from attnsieve.cache import policy_class

    fields = {f.name: f for f in dataclasses.fields(policy_class(kv).Params)}
    typed = {}
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(f"unknown parameter {key!r} for KV policy {kv!r}; it takes {sorted(fields)}")
        default = getattr(policy_class(kv).Params(), key)
        if default is None:  # optional numeric parameters (kv_bits=None): the value's own type
            for cast in (int, float):
                try:
                    typed[key] = cast(value)
                    break
                except ValueError:
                    continue
            else:
                typed[key] = None if value.lower() == "none" else value
        elif isinstance(default, bool):  # anything else is an error, never silently False
            if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(f"{key} expects true or false, got {value!r}")
            typed[key] = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, (int, float)):
            try:
                typed[key] = type(default)(value)
            except ValueError:
                raise ValueError(f"{key} expects a {type(default).__name__}, got {value!r}") from None
        else:
            typed[key] = value
    return typed


@app.command("heads")
def heads_cmd(
    model: Annotated[str, typer.Option(help="gemma3-270m, a local HF folder or a .gguf file")] = "gemma3-270m",
    lengths: Annotated[str, typer.Option(help="comma-separated prompt lengths in tokens")] = "4096",
    samples: Annotated[int, typer.Option(help="needle prompts per length (depths evenly spread)")] = 5,
    task: Annotated[str, typer.Option(help="needle task of the prompts: niah_single, passkey or another niah task")] =
        "niah_single",
    haystack: Annotated[str, typer.Option(help="filler around the needle: prose or repeat")] = "prose",
    sink_tokens: Annotated[int, typer.Option(help="first tokens whose attention is the sink mass")] = 4,
    local_window: Annotated[int, typer.Option(help="keys less than this far back count as local mass")] = 128,
    out_dir: Annotated[Path, typer.Option("--out", help="folder for heads.json and the heat maps")] = Path("heads"),
    refresh: Annotated[bool, typer.Option(help="recompute even if a cached profile exists")] = False,
    seed: Annotated[int, typer.Option(help="first prompt seed")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object last")] = False,
):
    """Profile every attention head: retrieval score, sink and local mass, entropy (heads.json + heat maps)."""
    from attnsieve.eval.tasks import TASKS
    from attnsieve.eval.tasks.haystack import check_haystack

    lens = _int_list(lengths, "--lengths")
    if task not in TASKS:
        raise ValueError(f"unknown --task {task!r}; choose from {', '.join(TASKS)}")
    check_haystack(haystack)
    from attnsieve.signals.heads import check_settings

    check_settings(lens, samples, sink_tokens, local_window, 256)
    limit = _model_context(model)
    if max(lens) > limit:
        raise ValueError(f"--lengths {max(lens)} exceeds the model's context ({limit})")
    dt = _dtype(dtype)
    _threads(threads)
    _seed(seed)
    from attnsieve.models import load
    from attnsieve.signals.heads import head_profiles, retrieval_query_heads, save_heatmaps

    with err.status(f"loading {model}"):
        mdl, tok = load(model, dtype=dt)
    prof = head_profiles(mdl, tok, lengths=lens, samples=samples, task=task, haystack=haystack,
                         sink_tokens=sink_tokens, local_window=local_window, seed=seed, name=model,
                         refresh=refresh)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "heads.json").write_text(json.dumps({**prof, **run_info(seed, dt)}, indent=1, default=str))
    pngs = save_heatmaps(prof, out_dir)
    try:
        top = sorted(retrieval_query_heads(prof, 0.1), key=lambda lh: -prof["layers"][lh[0]]["retrieval"][lh[1]])
    except ValueError:  # the model copied nothing: the profile is still worth writing
        top = []
    if as_json:
        _print_json({"out": str(out_dir), "layers": prof["layers"], "retrieval_top": [list(t) for t in top],
                     "copy_steps": prof["copy_steps"], "prompts": len(prof["prompts"])}, seed, dt)
        return
    table = Table(title=f"{model}: attention heads ({len(prof['prompts'])} prompts, {haystack})")
    for col in ("layer", "kind", "retrieval max (head)", "sink mass", "local mass", "entropy"):
        table.add_column(col)
    for row in prof["layers"]:
        r = row["retrieval"]
        best = max(range(len(r)), key=r.__getitem__)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        table.add_row(str(row["layer"]), f"sliding {row['window']}" if row["sliding"] else "global",
                      f"{r[best]:.2f} ({best})", f"{mean(row['sink_mass']):.3f}", f"{mean(row['local_mass']):.3f}",
                      f"{mean(row['entropy']):.2f}")
    out.print(table)
    if not top:
        err.print(f"[yellow]no head copied a needle token ({prof['copy_steps']} copying steps): the model did not "
                  "answer these prompts; retrieval scores are all 0 (try shorter --lengths or another --task)[/yellow]")
    err.print(f"[dim]top retrieval heads (layer, head): {top}; wrote {out_dir / 'heads.json'} and "
              f"{len(pngs)} heat maps[/dim]")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2 for bad input."""
    try:
        rv = app(args=argv, prog_name="attnsieve", standalone_mode=False)
    except cx.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else "usage: attnsieve COMMAND [OPTIONS]")
        sys.exit(0)
    except cx.ClickException as e:
        print(f"attnsieve: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("ATTNSIEVE_DEBUG"):
            raise
        print(f"attnsieve: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the machine, not the arguments: a full disk, a folder made read-only mid-run
        if os.environ.get("ATTNSIEVE_DEBUG"):
            raise
        print(f"attnsieve: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, _ABORT):
        print("attnsieve: interrupted", file=sys.stderr)
        sys.exit(130)
    if rv == 130:  # typer turns Ctrl-C inside a command into exit code 130; no command returns a number
        print("attnsieve: interrupted", file=sys.stderr)
    sys.exit(rv if isinstance(rv, int) else 0)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
