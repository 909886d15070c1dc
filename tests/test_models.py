"""Model loading: the conversion cache is atomic and locked; errors say what to do."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from attnsieve import models


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSIEVE_CACHE", str(tmp_path / "env"))
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert models.cache_root() == tmp_path / "env"
    monkeypatch.delenv("ATTNSIEVE_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "attnsieve"


def test_conversion_runs_once_under_the_lock_and_lands_atomically(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf: Path, target: Path) -> None:
        calls.append(gguf)
        staging = target.parent / ".staging"
        staging.mkdir()
        (staging / "config.json").write_text("{}")
        (staging / models._DONE).write_text(models._manifest(staging, gguf.name))
        staging.rename(target)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    results = []

    def worker():
        results.append(models._cached_folder("m", tmp_path, lambda work: work / "m.gguf"))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert (tmp_path / "m" / models._DONE).exists()


def test_interrupted_conversion_is_redone(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # half-written: no completion marker
    done = []

    def fake_convert(gguf, target):
        done.append(1)
        target.mkdir()
        (target / models._DONE).write_text(models._manifest(target, gguf.name))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    models._cached_folder("m", tmp_path, lambda work: work / "m.gguf")
    assert done == [1]


def test_missing_models_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "gemma3-270m", "no_such_module_for_attnsieve_test")
    with pytest.raises(ValueError, match=r"attnsieve\[models\]"):
        models.resolve("gemma3-270m", tmp_path)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a known name"):
        models.resolve(str(tmp_path / "nothing-here"), tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        models.load("gemma3-270m", dtype="int8")
