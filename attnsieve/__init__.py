"""attnsieve: training-free efficient attention for pretrained transformers, measured honestly.

    model, tok = attnsieve.load("gemma3-270m")
    with attnsieve.patched(model, "block-topk", density=0.1) as p:
        model(**tok(text, return_tensors="pt"), logits_to_keep=1)
    print(p.stats.density())

Importing attnsieve registers nothing with transformers; `patch()` does, explicitly.
"""

__version__ = "0.1.0"

_LAZY = {
    "patch": "attnsieve.integrations.hf",
    "unpatch": "attnsieve.integrations.hf",
    "patched": "attnsieve.integrations.hf",
    "stats": "attnsieve.integrations.hf",
    "load": "attnsieve.models",
    "methods": "attnsieve.methods",
    "rerank": "attnsieve.signals.rerank",
}


def __getattr__(name):
    # transformers is heavy to import; load it only when the integration is first used.
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(_LAZY[name])
        return mod if name == "methods" else getattr(mod, name)
    raise AttributeError(f"module 'attnsieve' has no attribute {name!r}")


__all__ = ["load", "methods", "patch", "patched", "rerank", "stats", "unpatch", "__version__"]
