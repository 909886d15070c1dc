"""Plan files: which method, with which parameters, runs in each attention layer of one model.

A plan is what `attnsieve tune` writes and what `attnsieve.patch(model, plan=...)` applies: a
versioned JSON object with `schema`, `model`, `fingerprint` (of the model's config: a plan is
refused by any other architecture), `target` (what the tuner was asked for), `layers`
({"3": {"method": "block-topk", "params": {"density": 0.1}}, ...}; global layers a plan does not
name stay dense; since schema 2 an entry may instead give one choice per query head,
{"5": {"method": "per-head", "heads": [{"method": "dense", "params": {}}, {"method": "window", ...}, ...]}},
run by `attnsieve.methods.heads.HeadSplit`), `calibration` (which prompts), the verified `kl`,
`top1`, `measured_density` and `time_ratio`, and `versions`, `threads`, `seed`, `dtype`, `device`.
Fields it does not know (`tuning`, the search report) are kept as they are.

This module is a leaf (json, hashlib and the method registry): the integration reads plans
through it without importing the tuner.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnsieve.methods import Method, has_param, make
from attnsieve.methods.heads import HeadSplit

# bump when a field changes meaning; older files stay readable, newer ones are refused.
# 1: per-layer choices; 2: a layer may give per-head choices (`heads`)
SCHEMA = 2
PER_HEAD = "per-head"  # the `method` of a layer entry that lists `heads`

# What a target means (all measured on the calibration prompts):
#   kl: mean KL(dense || plan) of the next-token distributions over the answer spans, at most `value`
#   top1: mean share of span positions whose top-1 token agrees with dense, at least `value`
#   layer_error: every replaced layer's mean relative output error (on the dense run's own layer
#     inputs, as eval's `layer_rel_err`), at most `value`
TARGET_KINDS = ("kl", "top1", "layer_error")

# Config fields that decide what a plan's layer indices and methods mean. A whitelist, so that a
# transformers upgrade adding unrelated config keys does not orphan every plan written before it.
FINGERPRINT_KEYS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_size", "intermediate_size", "vocab_size", "layer_types", "sliding_window",
    "max_position_embeddings", "query_pre_attn_scalar", "rope_theta", "rope_local_base_freq",
    "rope_parameters", "rope_scaling",
)


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def fingerprint(config_or_model) -> str:
    """"sha256:<16 hex>" of the architecture-defining fields of a model's (text) config."""
    config = getattr(config_or_model, "config", config_or_model)
    cfg = text_config(config)
    fields = {k: getattr(cfg, k, None) for k in FINGERPRINT_KEYS}
    blob = json.dumps(fields, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe_config(config_or_model) -> str:
    """One phrase naming an architecture, for error messages: "gemma3_text, 18 layers, 4 heads"."""
    cfg = text_config(getattr(config_or_model, "config", config_or_model))
    return (f"{getattr(cfg, 'model_type', '?')}, {getattr(cfg, 'num_hidden_layers', '?')} layers, "
            f"{getattr(cfg, 'num_attention_heads', '?')} heads")


@dataclass(frozen=True)
class Target:
    kind: str  # one of TARGET_KINDS
    value: float

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target kind must be one of {', '.join(TARGET_KINDS)}, got {self.kind!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"target {self.kind} must be a finite number, got {self.value!r}")
        if self.kind == "top1" and not 0 < self.value <= 1:
            raise ValueError(f"--target-top1 must be in (0, 1], got {self.value}")
        if self.kind == "kl" and not self.value > 0:
            raise ValueError(f"--target-kl must be > 0 (KL is a mean over answer tokens, in nats), got {self.value}")
        if self.kind == "layer_error" and not self.value > 0:
            raise ValueError(f"--target-layer-error must be > 0 (a relative error), got {self.value}")

    def met(self, kl: float | None = None, top1: float | None = None, layer_error: float | None = None) -> bool:
        """Whether measured numbers meet the target (the measure the target names must be given)."""
        got = {"kl": kl, "top1": top1, "layer_error": layer_error}[self.kind]
        if got is None:
            raise ValueError(f"the {self.kind} target needs a measured {self.kind}")
        return got >= self.value - 1e-12 if self.kind == "top1" else got <= self.value + 1e-12

    def to_json(self) -> dict:
        return {"kind": self.kind, "value": self.value}


@dataclass
class LayerChoice:
    """What runs in one layer: one method, or (`heads`) one choice per query head."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    heads: list[LayerChoice] | None = None  # per query head, in head order (method is then PER_HEAD)

    @classmethod
    def per_head(cls, heads: list[LayerChoice]) -> LayerChoice:
        """A per-head choice, or the one shared choice when every head has the same (run whole)."""
        if all(h == heads[0] for h in heads):
            return LayerChoice(heads[0].method, dict(heads[0].params))
        return cls(PER_HEAD, {}, [LayerChoice(h.method, dict(h.params)) for h in heads])

    def leaves(self) -> list[LayerChoice]:
        """The per-head choices, or [self] for a whole-layer choice."""
        return list(self.heads) if self.heads is not None else [self]

    def make(self, force_causal: bool = False) -> Method:
        """The method (a HeadSplit for per-head choices); `force_causal`: look-ahead estimators leak-free."""
        def one(c: LayerChoice) -> Method:
            params = dict(c.params)
            if force_causal and has_param(c.method, "causal"):
                params["causal"] = True
            return make(c.method, **params)

        if self.heads is None:
            return one(self)
        return HeadSplit([one(h) for h in self.heads])

    def to_json(self) -> dict:
        if self.heads is not None:
            return {"method": PER_HEAD, "heads": [h.to_json() for h in self.heads]}
        return {"method": self.method, "params": dict(self.params)}


@dataclass
class Plan:
    model: str  # the name or path the plan was tuned on (informative; the fingerprint decides)
    fingerprint: str
    target: Target
    layers: dict[int, LayerChoice]
    calibration: dict[str, Any] = field(default_factory=dict)
    kl: float | None = None  # verified on the calibration prompts (None: not verified)
    top1: float | None = None
    measured_density: float | None = None  # cell-weighted over the replaced layers, as Stats.density
    time_ratio: float | None = None  # attention time of the replaced layers / exact attention's, measured
    seed: int | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # dtype, device, tuning report, unknown fields
    schema: int = SCHEMA
    source: str | None = field(default=None, compare=False)  # the file it was loaded from (not written)

    def methods(self) -> dict[int, Method]:
        """{layer index: Method} for `patch(model, "dense", layers=...)`; ValueError naming a bad layer."""
        out = {}
        for idx, choice in sorted(self.layers.items()):
            try:
                out[idx] = choice.make()
            except (TypeError, ValueError) as e:
                raise ValueError(f"plan layer {idx}: {e}") from None
        return out

    def check_model(self, config_or_model) -> None:
        """Refuse (ValueError) a model whose config fingerprint differs from the plan's, or whose layers
        have another number of query heads than a per-head choice names."""
        got = fingerprint(config_or_model)
        if got != self.fingerprint:
            raise ValueError(
                f"this plan was tuned for {self.model!r} (fingerprint {self.fingerprint}); the model given is a "
                f"different architecture ({describe_config(config_or_model)}, fingerprint {got}); tune a plan "
                "for it with `attnsieve tune`"
            )
        n_heads = getattr(text_config(getattr(config_or_model, "config", config_or_model)), "num_attention_heads", None)
        for idx, choice in sorted(self.layers.items()):
            if choice.heads is not None and n_heads is not None and len(choice.heads) != n_heads:
                raise ValueError(f"plan layer {idx} gives {len(choice.heads)} per-head choices; the model has "
                                 f"{n_heads} query heads per layer")

    def label(self) -> str:
        """Short name for tables and result rows: "plan:kl<=0.05@sha256:abcd"."""
        op = ">=" if self.target.kind == "top1" else "<="
        return f"plan:{self.target.kind}{op}{self.target.value:g}@{self.fingerprint.removeprefix('sha256:')[:8]}"

    def record(self) -> dict:
        """What a result row records of the plan it ran: which plan (its file, if loaded from one), what it
        chose per layer."""
        return {"label": self.label(), "file": self.source, "model": self.model,
                "fingerprint": self.fingerprint, "target": self.target.to_json(),
                "layers": {str(i): c.to_json() for i, c in sorted(self.layers.items())}}

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA, "model": self.model, "fingerprint": self.fingerprint,
            "target": self.target.to_json(),
            "layers": {str(i): c.to_json() for i, c in sorted(self.layers.items())},
            "calibration": self.calibration, "kl": self.kl, "top1": self.top1,
            "measured_density": self.measured_density, "time_ratio": self.time_ratio,
            "versions": self.versions, "threads": self.threads, "seed": self.seed, **self.extra,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically (a reader never sees half a file)."""
        path = Path(path)
        text = json.dumps(self.to_json(), indent=1, default=str) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


_KNOWN = {"schema", "model", "fingerprint", "target", "layers", "calibration", "kl", "top1", "measured_density",
          "time_ratio", "versions", "threads", "seed"}


def _number_or_none(doc: dict, key: str, where: str) -> float | None:
    v = doc.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ValueError(f"{where}: {key!r} must be a number or null, got {v!r}")
    return v


def from_json(doc: Any, where: str = "plan") -> Plan:
    """A Plan from its JSON object; ValueError saying what is wrong (`where` names the source)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where} is not a plan: expected a JSON object, got {type(doc).__name__}")
    schema = doc.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise ValueError(f"{where} is not an attnsieve plan (no integer 'schema' field)")
    if schema > SCHEMA:
        raise ValueError(f"{where} has plan schema {schema}, newer than this attnsieve reads ({SCHEMA}); "
                         "upgrade attnsieve or tune the plan again")
    if schema < 1:
        raise ValueError(f"{where} has an invalid plan schema {schema}")
    missing = sorted({"model", "fingerprint", "target", "layers"} - doc.keys())
    if missing:
        raise ValueError(f"{where} is missing field(s) {', '.join(missing)}")
    if not isinstance(doc["fingerprint"], str) or not isinstance(doc["model"], str):
        raise ValueError(f"{where}: 'model' and 'fingerprint' must be strings")
    t = doc["target"]
    if not isinstance(t, dict) or not {"kind", "value"} <= t.keys():
        raise ValueError(f"{where}: 'target' must be an object with 'kind' and 'value'")
    try:
        target = Target(t["kind"], t["value"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(doc["layers"], dict):
        raise ValueError(f"{where}: 'layers' must be an object {{layer index: {{method, params}}}}")
    layers = {}
    for key, spec in doc["layers"].items():
        try:
            idx = int(key)
        except ValueError:
            raise ValueError(f"{where}: layer key {key!r} is not a layer index") from None
        if idx < 0 or str(idx) != key:
            raise ValueError(f"{where}: layer key {key!r} is not a layer index")
        layers[idx] = _layer_choice(spec, f"{where}: layer {idx}", schema)
    calibration = doc.get("calibration", {})
    if not isinstance(calibration, dict):
        raise ValueError(f"{where}: 'calibration' must be an object")
    threads, seed = doc.get("threads"), doc.get("seed")
    for name, v in (("threads", threads), ("seed", seed)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{where}: {name!r} must be an integer or null, got {v!r}")
    return Plan(
        model=doc["model"], fingerprint=doc["fingerprint"], target=target, layers=layers, calibration=calibration,
        kl=_number_or_none(doc, "kl", where), top1=_number_or_none(doc, "top1", where),
        measured_density=_number_or_none(doc, "measured_density", where),
        time_ratio=_number_or_none(doc, "time_ratio", where), seed=seed,
        versions=doc.get("versions") or {}, threads=threads,
        extra={k: v for k, v in doc.items() if k not in _KNOWN}, schema=schema,
    )


def _layer_choice(spec: Any, where: str, schema: int) -> LayerChoice:
    """One `layers` entry: {method, params} or, from schema 2, {method: "per-head", heads: [...]}."""
    if isinstance(spec, dict) and "heads" in spec:
        if schema < 2:
            raise ValueError(f"{where}: per-head choices ('heads') need plan schema 2, the file says {schema}")
        heads = spec["heads"]
        if spec.get("method", PER_HEAD) != PER_HEAD or "params" in spec:
            raise ValueError(f"{where}: an entry with 'heads' has no method of its own (method {PER_HEAD!r})")
        if not isinstance(heads, list) or not heads:
            raise ValueError(f"{where}: 'heads' must be a non-empty list, one {{method, params}} per query head")
        choice = LayerChoice(PER_HEAD, {}, [_leaf(h, f"{where} head {i}") for i, h in enumerate(heads)])
    else:
        choice = _leaf(spec, where)
    try:
        choice.make()  # validated now: unknown methods or bad values never reach a model
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return choice


def _leaf(spec: Any, where: str) -> LayerChoice:
    if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
        raise ValueError(f"{where} must be an object with a 'method' name")
    if spec["method"] == PER_HEAD:
        raise ValueError(f"{where}: method {PER_HEAD!r} needs a 'heads' list (and per-head choices do not nest)")
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"{where} 'params' must be an object")
    return LayerChoice(spec["method"], params)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan file; ValueError naming the file for a missing, corrupted or newer one."""
    p = Path(path)
    where = f"plan file {str(p)!r}"
    if p.is_dir():
        raise ValueError(f"{where} is a folder, not a file")
    if not p.exists():
        raise ValueError(f"{where} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is corrupted (not UTF-8 text)") from None
    except OSError as e:
        raise ValueError(f"{where} cannot be read: {e.strerror or e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is corrupted (not valid JSON: {e.msg} at line {e.lineno} column {e.colno})"
                         ) from None
    plan = from_json(doc, where)
    plan.source = str(p)
    return plan


def as_plan(plan: Plan | str | os.PathLike) -> Plan:
    """A Plan object as it is, or loaded from a path."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    raise TypeError(f"plan must be a Plan or the path of a plan file, got {type(plan).__name__} {plan!r}")
