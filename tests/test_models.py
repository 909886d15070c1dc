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


def fake_converter(calls: list):
    """A conversion that writes a small real safetensors file and the manifest, as the real one does."""
    import torch
    from safetensors.torch import save_file

    def convert(gguf: Path, target: Path) -> None:
        calls.append(gguf.name)
        staging = target.parent / f".tmp-{target.name}-staging0"
        staging.mkdir()
        (staging / "config.json").write_text("{}")
        save_file({"w": torch.arange(64, dtype=torch.float32)}, str(staging / "model.safetensors"))
        (staging / models._DONE).write_text(models._manifest(staging, gguf.name))
        staging.rename(target)

    return convert


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:-40])


def _randomise(p: Path):  # same size, other bytes
    import os

    p.write_bytes(os.urandom(p.stat().st_size))


def _empty(p: Path):
    p.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _randomise, _empty], ids=["truncated", "random", "empty"])
def test_damaged_cached_weights_are_reconverted_with_a_message_naming_the_folder(tmp_path, monkeypatch, capsys,
                                                                                  damage):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", fake_converter(calls))
    folder = models._cached_folder("m", tmp_path, lambda work: work / "m.gguf")
    assert models._cached_folder("m", tmp_path, lambda work: work / "m.gguf") == folder and len(calls) == 1
    damage(folder / "model.safetensors")
    capsys.readouterr()
    assert models._cached_folder("m", tmp_path, lambda work: work / "m.gguf") == folder
    assert len(calls) == 2
    err = capsys.readouterr().err
    assert f"the converted model in {folder} is damaged (model.safetensors" in err and "converting it again" in err
    assert models._cache_problem(folder) is None


def test_a_cache_converted_by_an_earlier_version_is_checked_by_its_safetensors_header(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", fake_converter(calls))
    folder = models._cached_folder("m", tmp_path, lambda work: work / "m.gguf")
    (folder / models._DONE).write_text("m.gguf")  # the marker earlier versions wrote: no sizes, no hashes
    assert models._cache_problem(folder) is None  # intact: not converted again
    _truncate(folder / "model.safetensors")
    assert "model.safetensors" in models._cache_problem(folder)
    models._cached_folder("m", tmp_path, lambda work: work / "m.gguf")
    assert len(calls) == 2


def test_a_cache_that_fails_to_load_names_its_folder(tmp_path, monkeypatch):
    (tmp_path / "gemma3-270m").mkdir()
    monkeypatch.setattr(models, "_cached_folder", lambda key, root, source: root / key)
    (tmp_path / "gemma3-270m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"the model in .*gemma3-270m cannot be loaded .*delete that folder"):
        models.load("gemma3-270m", cache_dir=tmp_path)


def test_cache_pointing_at_a_file_is_a_clear_error(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setenv("ATTNSIEVE_CACHE", str(f))
    with pytest.raises(ValueError, match=r"ATTNSIEVE_CACHE '.*file' is a file"):
        models.resolve("gemma3-270m")
    with pytest.raises(ValueError, match="cache_dir .* is a file"):
        models.resolve("gemma3-270m", f)


def test_orphans_of_killed_conversions_are_removed_but_not_those_of_running_ones(tmp_path, monkeypatch):
    import subprocess
    import sys

    calls = []
    monkeypatch.setattr(models, "_convert_gguf", fake_converter(calls))
    mine = [tmp_path / ".gguf-m-abcd1234", tmp_path / ".tmp-m-abcd1234"]  # a killed conversion of "m"
    legacy = tmp_path / ".gguf-abcd1234"  # an earlier version's (no model name in it)
    running = tmp_path / ".gguf-other-abcd1234"  # a conversion of another model, running now
    for d in [*mine, legacy, running]:
        d.mkdir()
    (tmp_path / "other.lock").touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); time.sleep(600)", str(tmp_path / "other.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        models._cached_folder("m", tmp_path, lambda work: work / "m.gguf")
    finally:
        holder.kill()
        holder.wait()
    assert not any(d.exists() for d in mine)
    assert running.exists() and legacy.exists()  # "other" is converting: an unnamed folder may be its own
    models._cached_folder("n", tmp_path, lambda work: work / "n.gguf")  # no conversion runs now
    assert not legacy.exists() and running.exists()  # "other"'s own folder is only removed under its lock
