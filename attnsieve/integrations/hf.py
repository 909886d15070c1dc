"""The only module that imports transformers: patch(), unpatch(), patched(), and measurement.

`patch()` registers one attention function and one mask function with transformers' interfaces
(explicitly, when called; nothing happens at import), switches the model to them, and attaches a
per-layer runtime to every attention module: which method runs there and where its measurements
go. Global layers run the chosen method in prefill; sliding-window layers run exact local
attention unless overridden per layer; decoding steps run each method's `decode` (exact for now).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function

from attnsieve.cache import KVPolicy, Rotary, WindowKV, make_policy
from attnsieve.integrations.hf_cache import KV_KWARG, PolicyCache
from attnsieve.kernels import dense_attention, exact_cells, local_attention
from attnsieve.kernels.block_sparse import check_backend_name, preferred_backend, resolve_backend
from attnsieve.methods import AttnOutput, LayerContext, Method, exact_attention, make

IMPL = "attnsieve"
_STATE = "_attnsieve_patch"
_RUNTIME = "_attnsieve_layer"


@dataclass
class LayerRecord:
    """Measurements of one attention call."""

    layer: int
    role: str  # "method": runs a method the patch put there; "local": a sliding layer's exact
    # local attention; "kept": kept exact by a per-layer override (both reported apart)
    phase: str  # "prefill" or "decode"
    method: str
    cells: int  # query-key cells computed
    exact_cells: int  # cells the exact layer computes
    estimate_s: float
    skipped_cells: int = 0  # cells scored but whose exp / value product a skip rule dropped (BLASST)


@dataclass
class Stats:
    """Measurements collected since the last reset. Densities follow DESIGN.md's definitions."""

    records: list[LayerRecord] = field(default_factory=list)

    def reset(self) -> None:
        self.records.clear()

    def _ratio(self, role: str, phase: str) -> float | None:
        rs = [r for r in self.records if r.role == role and r.phase == phase]
        total = sum(r.exact_cells for r in rs)
        return sum(r.cells for r in rs) / total if total else None

    def density(self, phase: str = "prefill") -> float | None:
        """Cell-weighted measured density over the layers the method replaces (exact layers excluded)."""
        return self._ratio("method", phase)

    def skipped_fraction(self, phase: str = "prefill") -> float | None:
        """Share of the method's computed cells whose exponentials and value products were skipped."""
        rs = [r for r in self.records if r.role == "method" and r.phase == phase]
        cells = sum(r.cells for r in rs)
        return sum(r.skipped_cells for r in rs) / cells if cells else None

    def local_density(self, phase: str = "prefill") -> float | None:
        """Measured density of the sliding-window layers (1.0 when they run exact local attention)."""
        return self._ratio("local", phase)

    def estimate_s(self, phase: str = "prefill") -> float:
        return sum(r.estimate_s for r in self.records if r.phase == phase)

    def per_layer(self, phase: str = "prefill") -> dict[int, float]:
        cells: dict[int, list[int]] = {}
        for r in self.records:
            if r.phase == phase:
                c = cells.setdefault(r.layer, [0, 0])
                c[0] += r.cells
                c[1] += r.exact_cells
        return {k: c / e if e else 1.0 for k, (c, e) in sorted(cells.items())}

    def summary(self) -> dict[str, Any]:
        return {
            "density": self.density(),
            "local_density": self.local_density(),
            "skipped_fraction": self.skipped_fraction(),
            "estimate_s": self.estimate_s(),
            "per_layer_density": self.per_layer(),
        }


@dataclass
class CapturedLayer:
    """One attention call's inputs, kept so fidelity metrics can replay a method on them."""

    q: torch.Tensor  # [B, H, Tq, D] post-RoPE queries
    k: torch.Tensor  # [B, Hkv, Tk, D]
    v: torch.Tensor
    ctx: LayerContext
    role: str  # as in LayerRecord


@dataclass
class LayerRuntime:
    method: Method | None  # None: the layer's exact attention (local on sliding layers)
    role: str  # as in LayerRecord
    stats: Stats
    capture: dict[int, CapturedLayer] | None = None  # shared by all layers while capturing
    rope: tuple[torch.nn.Module, str] | None = None  # (rotary module, its inv_freq buffer's name) for this layer
    backend: str | None = None  # block-sparse kernel backend its calls run (None: the fastest available)


@dataclass
class Patch:
    """Handle returned by patch(): the model, its per-layer methods and the measurements."""

    model: Any
    method: Method
    layers: dict[int, str]  # layer index -> what runs there (for reports)
    stats: Stats
    previous_impl: str
    kv: KVPolicy | None = None  # the decoding-cache policy, if any
    windows: dict[int, int | None] = field(default_factory=dict)  # layer -> native sliding window
    hook: Any = None  # forward pre-hook that gives every new forward an attnsieve cache
    active: bool = True  # False once unpatched: caches made by this patch then refuse to continue
    plan: Any = None  # the tuned plan applied (attnsieve.tune.Plan), if patch() was given one
    tokenizer: Any = None  # for policies that replay text over the cache (KVzip)
    replay_hook: Any = None  # forward hook that runs such a policy's replay after a prefill
    replaying: bool = False  # True while the replay's own forwards run
    backend: str = "auto"  # the block-sparse kernel backend the patched layers run

    def unpatch(self) -> None:
        unpatch(self.model)

    @torch.no_grad()
    def compress_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PolicyCache:
        """Query-agnostic compression: prefill `input_ids` (a context, without its question) into a new
        cache of this patch's policy, let the policy compress it, and freeze it (`PolicyCache.freeze`).
        Then append questions and answers with `model(ids, cache=cache)` or
        `model.generate(..., past_key_values=cache)`: the policy never sees them before compressing."""
        if self.kv is None:
            raise ValueError("compress_context needs a KV-cache policy: patch(model, kv=POLICY, kv_budget=B)")
        if not self.active:
            raise RuntimeError("this patch was unpatched; patch the model again")
        cache = self.new_cache()
        self.model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1)
        cache.freeze()
        return cache

    def new_cache(self) -> PolicyCache:
        """A fresh cache for this patch: the policy's compressed global layers, exact sliding windows.

        It belongs to this patch: used after `unpatch()` (say, by a `generate` that was running),
        its next forward raises instead of letting stock attention read a compressed past."""
        return PolicyCache(self.kv, len(self.windows), self.windows, owner=self)

    @contextlib.contextmanager
    def capturing(self):
        """Keep every prefill call's q, k, v (by layer) while the block runs; yields the dict."""
        store: dict[int, CapturedLayer] = {}
        runtimes = [getattr(m, _RUNTIME) for m in _attention_modules(self.model).values()]
        for rt in runtimes:
            rt.capture = store
        try:
            yield store
        finally:
            for rt in runtimes:
                rt.capture = None


def _check_mask_function(mask_function, local_size) -> None:
    """Accept only the masks attnsieve executes exactly: causal, causal + sliding window, bidirectional."""
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        return
    closure = getattr(mask_function, "__closure__", None) or ()
    parts = closure[0].cell_contents if closure else None
    if (
        local_size is not None
        and getattr(mask_function, "__qualname__", "") == "and_masks.<locals>.and_mask"
        and isinstance(parts, tuple)
        and len(parts) == 2
        and parts[1] is causal_mask_function
        and getattr(parts[0], "__qualname__", "").startswith("sliding_window_overlay")
    ):
        return
    raise ValueError(
        "attnsieve cannot honour this attention mask exactly (packed sequences, bidirectional "
        "blocks or a custom mask function); run the model unpatched for such inputs"
    )


def _mask_function(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
    attention_mask=None, local_size=None, **kwargs,
):
    """Registered mask function: returns the 2D key-padding mask [B, kv_length], or None."""
    _check_mask_function(mask_function, local_size)
    if attention_mask is None:
        return None
    am = attention_mask[:, -kv_length:].to(torch.bool)
    if am.shape[1] < kv_length:  # keys before the mask's start are real tokens
        am = torch.nn.functional.pad(am, (kv_length - am.shape[1], 0), value=True)
    return None if bool(am.all()) else am


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered attention function: dispatches to the layer's method and records measurements."""
    rt: LayerRuntime | None = getattr(module, _RUNTIME, None)
    if rt is None:
        raise RuntimeError("attnsieve attention called on a module that patch() did not prepare")
    with preferred_backend(rt.backend):  # the patch's backend for every kernel call the method makes
        return _layer_attention(rt, module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _layer_attention(rt: LayerRuntime, module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    if dropout and module.training:
        raise ValueError(f"attention dropout ({dropout}) is not supported; call model.eval() first")
    Tq, Tk = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"custom {attention_mask.dim()}D attention masks are not supported by attnsieve "
            "(pass a 2D padding mask, or run the model unpatched)"
        )
    key_valid = None
    if attention_mask is not None:
        key_valid = attention_mask[:, -Tk:].to(torch.bool)
        if key_valid.shape[1] != Tk:
            raise ValueError(f"padding mask covers {key_valid.shape[1]} keys, expected {Tk}")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = bool(getattr(module, "is_causal", True))
    ctx = LayerContext(module.layer_idx, scale, window, key_valid, causal)
    cache_layer = kwargs.get(KV_KWARG)
    if cache_layer is not None:
        cache_layer.kv.rotary = _rotary(rt, kwargs.get("position_ids"), query, cache_layer.kv.seen)
        return _attention_with_policy_cache(rt, module, query, key, value, ctx, cache_layer.kv)
    phase = "decode" if Tq == 1 and Tk > 1 else "prefill"  # one new token over a cache
    if rt.capture is not None and phase == "prefill":
        rt.capture[module.layer_idx] = CapturedLayer(query, key, value, ctx, rt.role)
    if rt.method is None:
        res = exact_attention(query, key, value, ctx)
    elif phase == "decode":
        res = rt.method.decode(query, key, value, ctx)
    else:
        res = rt.method.prefill(query, key, value, ctx)
    exact = query.shape[1] * exact_cells(Tq, Tk, causal=causal, window=window, key_valid=key_valid,
                                         batch=query.shape[0])
    name = "exact" if rt.method is None else rt.method.name
    rt.stats.records.append(
        LayerRecord(module.layer_idx, rt.role, phase, name, res.cells, exact, res.estimate_s, res.skipped_cells)
    )
    return res.out.transpose(1, 2).contiguous(), None


def _rotary(rt: LayerRuntime, position_ids, query, seen: int) -> Rotary | None:
    """The RoPE this call's q and k carry (for policies that reason about positions), or None if unknown."""
    if rt.rope is None:
        return None
    B, _, Tq, _ = query.shape
    if position_ids is None:  # what the model itself uses then: positions continue the cache
        position_ids = torch.arange(seen, seen + Tq, device=query.device)[None]
    if position_ids.dim() != 2 or position_ids.shape[-1] != Tq:  # e.g. multimodal M-RoPE positions [3, B, T]
        return None
    module, name = rt.rope
    return Rotary(getattr(module, name), position_ids.expand(B, Tq))


def _rotary_modules(model) -> list[torch.nn.Module]:
    """The decoder's rotary-embedding modules (a vision tower's are left out)."""
    return [
        m for path, m in model.named_modules()
        if type(m).__name__.endswith("RotaryEmbedding") and "vision" not in path and "visual" not in path
    ]


def _rope_source(rotaries: list[torch.nn.Module], module) -> tuple[torch.nn.Module, str] | None:
    """Where this attention layer's RoPE frequencies live: a rotary module and its buffer's name.

    Read at each call, not copied, so rotary types that update their frequencies (dynamic NTK) stay right.
    Gemma-3 keeps one buffer per layer type (`full_attention_inv_freq`), Llama-style models one `inv_freq`.
    """
    layer_type = getattr(module, "layer_type", None)
    names = ([f"{layer_type}_inv_freq"] if layer_type else []) + ["inv_freq"]
    for m in rotaries:
        for name in names:
            if isinstance(getattr(m, name, None), torch.Tensor):
                return m, name
    return None


def _attention_with_policy_cache(rt: LayerRuntime, module, query, key, value, ctx: LayerContext, kv):
    """Attention over an attnsieve cache layer's stored past plus the new tokens; stores them."""
    Tq = query.shape[2]
    phase = "decode" if Tq == 1 and kv.seen > 0 else "prefill"
    # real tokens stored so far per batch row, from the cache's host-side counts (no GPU sync per step)
    past_real = torch.tensor(kv.valid_host) if kv.valid_host else None
    if past_real is not None and ctx.window is not None:  # a sliding layer sees at most window - 1 past keys
        past_real = past_real.clamp_max(ctx.window - 1)
    estimate_s = 0.0
    name = "exact" if rt.method is None else rt.method.name

    def new_attention(q, k, v):
        nonlocal estimate_s
        if rt.capture is not None and phase == "prefill" and kv.seen == 0:
            rt.capture[module.layer_idx] = CapturedLayer(q, k, v, ctx, rt.role)
        if phase == "prefill" and rt.method is not None:
            res = rt.method.prefill(q, k, v, ctx)
        elif phase == "prefill" and kv.seen == 0:
            res = exact_attention(q, k, v, ctx)
        else:  # new tokens over themselves; the past is merged through lse
            res = None
        if (res is None or (kv.seen > 0 and res.lse is None)) and q.shape[2] > 1:
            # a continuation (question, prefill chunk, KVzip replay): exact causal attention with its
            # log-sum-exp from the block kernel (a band as wide as the call, or the layer's window)
            band = local_attention(q, k, v, window=ctx.window or q.shape[2], scale=ctx.scale,
                                   key_valid=ctx.key_valid)
            res = AttnOutput(band.out, band.cells, lse=band.lse)
        elif res is None or (kv.seen > 0 and res.lse is None):
            out, lse = dense_attention(q, k, v, causal=True, window=ctx.window, scale=ctx.scale,
                                       key_valid=ctx.key_valid)
            cells = q.shape[1] * exact_cells(q.shape[2], k.shape[2], window=ctx.window, key_valid=ctx.key_valid,
                                             batch=q.shape[0])
            res = AttnOutput(out, cells, lse=lse)
        estimate_s = res.estimate_s
        return res

    out, cells = kv.attend(query, key, value, ctx.key_valid, ctx.scale, new_attention)
    H = query.shape[1]
    if Tq == 1 and ctx.key_valid is None and past_real is not None:  # a decoding step: itself + its past
        exact = H * (query.shape[0] + int(past_real.sum()))
    else:
        exact = H * exact_cells(Tq, Tq, window=ctx.window, key_valid=ctx.key_valid, batch=query.shape[0])
    if past_real is not None and not (Tq == 1 and ctx.key_valid is None):
        q_real = torch.full((query.shape[0],), Tq) if ctx.key_valid is None else ctx.key_valid.sum(-1).cpu()
        if ctx.window is None:
            exact += H * int((q_real * past_real.cpu()).sum())
        else:  # each new query sees past keys within its window
            steps = torch.arange(Tq)
            per_q = (past_real.cpu()[:, None] - steps[None, :]).clamp_min(0)  # [B, Tq]
            qv = torch.ones(query.shape[0], Tq, dtype=torch.bool) if ctx.key_valid is None else ctx.key_valid.cpu()
            exact += H * int((per_q * qv).sum())
    rt.stats.records.append(LayerRecord(module.layer_idx, rt.role, phase, name, cells, exact, estimate_s))
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    AttentionInterface.register(IMPL, _attention)
    AttentionMaskInterface.register(IMPL, _mask_function)


def _attention_modules(model) -> dict[int, torch.nn.Module]:
    mods = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and type(m).__name__.endswith("Attention"):
            mods[idx] = m
    return mods


def _refuse_unsupported(model, modules) -> None:
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text_cfg, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"this model uses attention logit soft-capping ({text_cfg.attn_logit_softcapping}); "
            "attnsieve's kernels would silently compute something else, so patch() refuses it"
        )
    if getattr(text_cfg, "alibi", False) or getattr(text_cfg, "use_alibi", False) or text_cfg.model_type in (
        "bloom",
        "mpt",
    ):
        raise ValueError("this model uses ALiBi position biases, which attnsieve's kernels do not add")
    if any(hasattr(m, "sinks") for m in modules.values()):
        raise ValueError("this model has learned attention-sink logits, which attnsieve's kernels do not add")
    causal = [bool(getattr(m, "is_causal", True)) for m in modules.values()]
    if getattr(text_cfg, "use_bidirectional_attention", False) or (any(causal) and not all(causal)):
        raise ValueError(
            "attnsieve patches causal decoders and fully bidirectional encoders; this model mixes "
            "causal and bidirectional layers"
        )
    if not modules or not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
        )


def _as_method(spec, params: dict) -> Method:
    if isinstance(spec, Method):
        if params:
            raise ValueError("pass parameters either inside the method object or as keywords, not both")
        return spec
    if isinstance(spec, str):
        return make(spec, **params)
    raise TypeError(f"method must be a registered name or a Method object, got {type(spec).__name__}")


def patch(
    model,
    method: str | Method = "dense",
    *,
    kv: str | None = None,
    kv_budget: float | None = None,
    layers: dict[int, str | Method] | None = None,
    plan=None,
    tokenizer=None,
    backend: str | None = None,
    **params,
) -> Patch:
    """Run `method` in the model's global attention layers; returns a handle with measurements.

    Sliding-window layers run exact local attention (in a model whose every layer slides, the
    method runs in all of them, inside each layer's window).
    `layers` overrides per layer ({0: "dense"} keeps layer 0 exact; naming a sliding-window layer
    runs that method there, inside the layer's own window). `kv`/`kv_budget` choose a decoding
    cache policy (`attnsieve.cache.policy_names()`); keyword parameters starting with `kv_` go to
    the policy, the others to the method. With a policy, every forward that starts a new cache
    (including `model.generate`) gets the policy's cache: global layers compressed as the policy
    says, sliding layers holding exactly their window. Refuses attention it cannot honour exactly.
    `plan` (a tuned plan, `attnsieve.tune.Plan` or the path of its JSON file) sets every layer instead
    of `method`/`layers`: the layers it names run its choices, every other global layer stays dense;
    a plan tuned for another architecture (config fingerprint) is refused.
    `tokenizer` is used by policies that replay text over the cache (KVzip's "repeat the previous
    context"); without it, such a policy loads the tokenizer saved beside the model.
    `backend` chooses the block-sparse kernel every patched layer runs its supports on ("compiled", "mkl",
    "flash", "matmul", "flex", "flex-eager"; None or "auto": the fastest available on the model's device,
    flex on CUDA). It is a patch option, not a method parameter: every method runs on it unchanged.
    """
    check_backend_name(backend)
    kv_params = {k: params.pop(k) for k in list(params) if k.startswith("kv_")}
    plan_obj = None
    if plan is not None:
        from attnsieve.tune.plan import as_plan  # a leaf module: the plan format, not the tuner

        if not (isinstance(method, str) and method == "dense") or layers is not None or params:
            raise ValueError("plan= chooses every layer's method; pass no method, layers or method parameters with it")
        plan_obj = as_plan(plan)
        _check_model(model)
        plan_obj.check_model(model)
        layers = plan_obj.methods()
    if kv is None and (kv_budget is not None or kv_params):
        raise ValueError(f"kv_budget / {sorted(kv_params) or 'kv_*'} need a KV-cache policy: pass kv=NAME")
    _check_model(model)
    if kv is not None and not isinstance(kv, str):
        raise TypeError(f"kv must be a KV-cache policy name (str) or None, got {type(kv).__name__} {kv!r}")
    if layers is not None and not isinstance(layers, dict):
        raise TypeError(f"layers must be a dict {{layer index: method}}, got {type(layers).__name__}")
    if getattr(model, _STATE, None) is not None:
        raise ValueError("model is already patched; call attnsieve.unpatch(model) first")
    modules = _attention_modules(model)
    _refuse_unsupported(model, modules)
    main = _as_method(method, params)
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = text_cfg.num_hidden_layers
    layer_types = getattr(text_cfg, "layer_types", None) or ["full_attention"] * n_layers
    overrides = {}
    for idx, spec in (layers or {}).items():
        if isinstance(idx, bool) or not isinstance(idx, int):  # True would silently mean layer 1
            raise TypeError(f"layers keys must be int layer indices, got {type(idx).__name__} {idx!r}")
        if not 0 <= idx < n_layers:
            raise ValueError(f"layer index {idx!r} out of range [0, {n_layers - 1}]")
        if not isinstance(spec, (str, Method)):
            raise TypeError(f"layers[{idx}] must be a registered name or a Method object, got {type(spec).__name__}")
        overrides[idx] = _as_method(spec, {})
    encoder = not any(bool(getattr(m, "is_causal", True)) for m in modules.values())
    for m in [main, *overrides.values()]:
        if encoder and not m.runs_bidirectional():
            raise ValueError(f"{m.name} is a causal method; this model's attention is bidirectional")
        if not encoder and not m.supports_causal_mask:
            raise ValueError(
                f"{m.name} is non-causal (it cannot mask the future); use it in a bidirectional encoder"
            )
    if encoder and kv is not None:
        raise ValueError("KV-cache policies are for decoders; this model is a bidirectional encoder")

    if backend not in (None, "auto"):  # refuse a backend this model's device / dtype cannot run, before patching
        param = next(model.parameters(), None)
        dev = param.device if param is not None else torch.device("cpu")
        dt = param.dtype if param is not None else torch.float32
        resolve_backend(backend, dev, torch.float32 if dt in (torch.float16, torch.bfloat16) else dt)
    n_global = sum(1 for i in range(n_layers) if layer_types[i] != "sliding_attention")
    policy = None if kv is None else make_policy(kv, kv_budget, n_layers=max(1, n_global), **kv_params)

    _register()
    stats = Stats()
    described = {}
    sliding = {
        idx: layer_types[idx] == "sliding_attention" or getattr(mod, "sliding_window", None) is not None
        for idx, mod in modules.items()
    }
    every_layer_slides = all(sliding.values())  # e.g. Mistral-style models: the method runs in every window
    rotaries = _rotary_modules(model) if policy is not None else []
    for idx, mod in modules.items():
        chosen = overrides.get(idx, None if sliding[idx] and not every_layer_slides else main)
        if chosen is None:  # only sliding layers run without a method: their exact local attention
            role = "local"
        else:
            role = "kept" if chosen.name == "dense" and main.name != "dense" else "method"
        rope = _rope_source(rotaries, mod) if policy is not None else None
        setattr(mod, _RUNTIME, LayerRuntime(chosen, role, stats, rope=rope, backend=backend))
        described[idx] = ("exact-local" if sliding[idx] else "exact") if chosen is None else chosen.name
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPL)
    windows = {
        i: (getattr(modules[i], "sliding_window", None) or getattr(text_cfg, "sliding_window", None))
        if sliding.get(i) else None
        for i in range(n_layers)
    }
    if policy is not None and policy.replays and policy.budget < 1:
        tokenizer = _policy_tokenizer(model, tokenizer)  # refused here, before anything runs, if there is none
    handle = Patch(model, main, described, stats, previous, policy, windows, plan=plan_obj,
                   backend=backend or "auto", tokenizer=tokenizer)
    if policy is not None:
        handle.hook = model.register_forward_pre_hook(_give_policy_cache(handle), with_kwargs=True)
    if policy is not None and policy.replays and policy.budget < 1:
        handle.replay_hook = model.register_forward_hook(_replay_after_prefill(handle), with_kwargs=True)
    setattr(model, _STATE, handle)
    return handle


def _give_policy_cache(handle: Patch):
    """Forward pre-hook: a forward that would start a fresh DynamicCache gets an attnsieve cache instead."""

    def hook(module, args, kwargs):
        if kwargs.get("use_cache") is False:
            return None
        cache = kwargs.get("cache")
        if cache is None or (not isinstance(cache, PolicyCache) and cache.get_seq_length() == 0):
            kwargs["cache"] = handle.new_cache()
            return args, kwargs
        if not isinstance(cache, PolicyCache):
            raise ValueError(
                "a KV-cache policy is patched in, but this forward continues a transformers cache that "
                "already holds tokens; start from an empty cache (or none)"
            )
        return None

    return hook


def _policy_tokenizer(model, tokenizer):
    """The tokenizer a replaying policy uses: the one given to patch(), else the one saved beside the model."""
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    where = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except Exception as e:  # no tokenizer files there: say what to pass instead
        raise ValueError(
            f"this KV policy replays text over the cache and needs the model's tokenizer; none could be loaded "
            f"from {where!r} ({type(e).__name__}); pass patch(..., tokenizer=tok)"
        ) from e


def _replay_after_prefill(handle: Patch):
    """Forward hook: after a forward that stored more than one new token in a policy cache that is not
    frozen, run the policy's replay passes over that cache (KVzip's context reconstruction), then let
    the policy compress. The replay's own forwards store nothing and are left out of the measurements."""

    def hook(module, args, kwargs, output):
        if handle.replaying or not handle.active:
            return None
        cache = kwargs.get("cache")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(cache, PolicyCache) or ids is None or ids.dim() != 2 or ids.shape[1] < 2:
            return None
        scored = [layer.kv for layer in cache.layers if not isinstance(layer.kv, WindowKV)]
        if not scored or scored[0].frozen or not scored[0].keys:
            return None
        mask = kwargs.get("attention_mask")
        _replay(handle, cache, scored, ids, None if mask is None else mask[:, -ids.shape[1]:].bool())
        return None

    return hook


@torch.no_grad()
def _replay(handle: Patch, cache: PolicyCache, scored, ids: torch.Tensor, mask) -> None:
    rows = [(ids[b] if mask is None else ids[b][mask[b]]).tolist() for b in range(ids.shape[0])]
    passes = handle.kv.replay_passes(scored, rows, handle.tokenizer)
    n_records = len(handle.stats.records)
    handle.replaying = True
    device = ids.device
    try:
        for rp in passes:
            for layer in cache.layers:
                layer.kv.probing = rp.spans
            pmask = rp.mask.to(device)
            positions = scored[0].valid_seen.to(device)[:, None] + pmask.long().cumsum(-1) - 1
            padded = not bool(pmask.all())
            full = torch.cat([torch.ones(ids.shape[0], cache.get_seq_length(), dtype=torch.long, device=device),
                              pmask.long()], dim=1) if padded else None
            handle.model(rp.ids.to(device), attention_mask=full, position_ids=positions.clamp_min(0), cache=cache,
                         use_cache=True, logits_to_keep=1)
    finally:
        for layer in cache.layers:
            layer.kv.probing = None
        handle.replaying = False
        del handle.stats.records[n_records:]  # the replay is the policy's cost, not the method's cells
    handle.kv.finish_replay(scored)


def _check_model(model) -> None:
    if not isinstance(model, PreTrainedModel):
        hint = f"; load one first: model, tok = attnsieve.load({model!r})" if isinstance(model, str) else ""
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}{hint}")


def unpatch(model) -> None:
    """Restore the attention implementation the model had before patch().

    With a KV-cache policy, a generation still running on the patch's cache (unpatch from a logits
    processor or a callback) cannot go on: that cache holds only the policy's compressed past,
    which stock attention cannot read. Its next step raises a RuntimeError saying so, rather than
    silently attending to the current token alone. Unpatch after `generate` returns.
    """
    _check_model(model)
    handle: Patch | None = getattr(model, _STATE, None)
    if handle is None:
        raise ValueError("model is not patched by attnsieve")
    handle.active = False
    if handle.hook is not None:
        handle.hook.remove()
    if handle.replay_hook is not None:
        handle.replay_hook.remove()
    for mod in _attention_modules(model).values():
        if hasattr(mod, _RUNTIME):
            delattr(mod, _RUNTIME)
    model.set_attn_implementation(handle.previous_impl)
    delattr(model, _STATE)


@contextlib.contextmanager
def patched(model, method: str | Method = "dense", **kwargs):
    """`with attnsieve.patched(model, "block-topk", density=0.1) as p:` ... unpatched on exit."""
    handle = patch(model, method, **kwargs)
    try:
        yield handle
    finally:
        unpatch(model)


def stats(model) -> Stats:
    _check_model(model)
    handle: Patch | None = getattr(model, _STATE, None)
    if handle is None:
        raise ValueError("model is not patched by attnsieve")
    return handle.stats
