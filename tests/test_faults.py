"""Fault injection: killed, interrupted and concurrent runs, full and read-only targets, damaged files.

What must hold after each fault: results.jsonl has only complete rows, each cell once; a resumed
run computes exactly what is missing; every failure is one line on stderr (exit 2 for bad input,
1 for a failing machine, 130 for Ctrl-C), found before any model loads where it can be.
The model is a tiny random-init Gemma-3 with a byte-level tokenizer saved in the test (no
downloads). Child processes run with ATTNSIEVE_COMPILED=0 so none waits on a kernel build.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from attnsieve import models
from attnsieve.cli import main
from attnsieve.eval import results
from attnsieve.eval.results import row_key

from tiny_models import save_tiny_eval_model

REPO = Path(__file__).resolve().parents[1]
GRID = ["--methods", "dense,window", "--set", "window.block_size=16", "--tasks", "passkey", "--lengths", "256",
        "--samples", "2"]
CELLS = 4  # 2 configurations x 2 samples
PATIENCE_S = 600  # only so a broken child cannot hang the suite; no test relies on a machine's speed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_eval_model(tmp_path_factory.mktemp("tiny") / "model")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def one_error_line(err: str) -> str:
    """The one line of a failure; progress lines of a run that had started are not errors."""
    errs = [ln for ln in lines(err) if not ln.startswith("attnsieve eval [")]
    assert len(errs) == 1 and "Traceback" not in err, err
    return errs[0]


def stored_rows(out: Path) -> list[dict]:
    """Every line of results.jsonl must be a complete row: no fragment, no broken line."""
    text = (out / "results.jsonl").read_text()
    assert text == "" or text.endswith("\n"), f"results.jsonl ends in a fragment: {text[-80:]!r}"
    return [json.loads(ln) for ln in text.splitlines()]


def assert_each_cell_once(out: Path, cells: int = CELLS) -> None:
    keys = [row_key(r) for r in stored_rows(out)]
    assert len(keys) == len(set(keys)), f"duplicated cells: {sorted(keys)}"
    assert len(keys) == cells, f"{len(keys)} rows, expected {cells}"


def no_model_load(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(models, "load", refuse)


def child_env() -> dict:
    env = dict(os.environ, ATTNSIEVE_COMPILED="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until `path` exists; fails with the child's stderr if it ends first."""
    start = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"child ended ({proc.returncode}) before {path.name}: {proc.stderr.read()}")
        assert time.monotonic() - start < PATIENCE_S, "child hung"
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=PATIENCE_S)
    return proc.returncode, out, err


def eval_args(out: Path, model_dir: Path) -> list[str]:
    return ["eval", "--out", str(out), "--model", str(model_dir), *GRID]


# ----- killed and interrupted runs --------------------------------------------------------------

KILLED_MID_APPEND = """
    import os, signal, sys, types
    from attnsieve.eval import results
    from attnsieve.cli import main

    calls = []

    def write(fd, data):  # the second append: half of its first line reaches the disk, then SIGKILL
        calls.append(1)
        if len(calls) == 2:
            os.write(fd, bytes(data[: bytes(data).index(b"\\n") // 2]))
            os.kill(os.getpid(), signal.SIGKILL)
        return os.write(fd, data)

    results.os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    results.os.write = write
    main(sys.argv[1:])
"""


def test_sigkill_mid_append_then_resume_loses_and_duplicates_nothing(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    code, _, err = finish(spawn(KILLED_MID_APPEND, *eval_args(out, model_dir)))
    assert code == -signal.SIGKILL, err
    text = (out / "results.jsonl").read_text()
    assert not text.endswith("\n") and len(text.splitlines()) == 3, "two rows and half of the third"

    code, _, err = cli(capsys, *eval_args(out, model_dir))
    assert code == 0, err
    assert "1 input(s) evaluated, 2 row(s) reused" in err
    assert_each_cell_once(out)
    code, _, err = cli(capsys, *eval_args(out, model_dir))  # a finished grid: nothing computed again
    assert code == 0 and "0 input(s) evaluated, 4 row(s) reused" in err, err
    assert_each_cell_once(out)


INTERRUPTED_IN_SECOND_INPUT = """
    import pathlib, sys, time
    from attnsieve.eval import runner
    from attnsieve.cli import main

    ready = pathlib.Path(sys.argv[1])
    real = runner.evaluate_input

    def evaluate_input(*args, **kwargs):
        if args[5] == 1:  # the second sample: say so, then compute for a long time
            ready.touch()
            time.sleep(600)
        return real(*args, **kwargs)

    runner.evaluate_input = evaluate_input
    main(sys.argv[2:])
"""


def test_sigint_says_interrupted_and_the_run_resumes(tmp_path, model_dir, capsys):
    out, ready = tmp_path / "out", tmp_path / "ready"
    proc = spawn(INTERRUPTED_IN_SECOND_INPUT, str(ready), *eval_args(out, model_dir))
    wait_for(ready, proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 130, err
    assert one_error_line(err) == "attnsieve: interrupted"
    assert len(stored_rows(out)) == 2  # the first input's rows, complete

    code, _, err = cli(capsys, *eval_args(out, model_dir))
    assert code == 0 and "1 input(s) evaluated, 2 row(s) reused" in err, err
    assert_each_cell_once(out)


def test_two_concurrent_evals_on_one_out_never_duplicate_a_cell(tmp_path, model_dir):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "attnsieve", *eval_args(out, model_dir)]
    procs = [subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    done = [finish(p) for p in procs]
    for code, _, err in done:
        if code == 2:  # it found the folder claimed: refused at once, with one line
            assert "in use by another attnsieve eval" in one_error_line(err)
        else:  # it ran alone, or after the other finished (then computing nothing)
            assert code == 0, err
    assert any(code == 0 for code, _, _ in done)
    assert_each_cell_once(out)


HOLD_LOCK = """
    import sys, time
    from filelock import FileLock

    lock = FileLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_claimed_out_is_refused_before_the_model_loads(tmp_path, model_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    holder = spawn(HOLD_LOCK, str((out / results.LOCK).resolve()))
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        no_model_load(monkeypatch)
        code, _, err = cli(capsys, *eval_args(out, model_dir))
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert "in use by another attnsieve eval" in one_error_line(err)


# ----- full and read-only targets (simulated: the tests may run as root) ----------------------------


def os_with(**overrides):
    import types

    ns = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    for k, v in overrides.items():
        setattr(ns, k, v)
    return ns


def test_full_disk_leaves_no_partial_row_and_is_one_line(tmp_path, model_dir, capsys, monkeypatch):
    out = tmp_path / "out"

    def write(fd, data):  # half of the line fits, then the disk is full
        os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results, "os", os_with(write=write))
    code, _, err = cli(capsys, *eval_args(out, model_dir))
    assert code == 1
    assert "No space left on device" in one_error_line(err)
    assert stored_rows(out) == []  # the cut-short row was taken back

    monkeypatch.undo()
    code, _, err = cli(capsys, *eval_args(out, model_dir))
    assert code == 0, err
    assert_each_cell_once(out)


def test_read_only_out_is_refused_before_the_model_loads(tmp_path, model_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()

    def open_(path, flags, *args):
        if Path(path).parent == out and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return os.open(path, flags, *args)

    monkeypatch.setattr(results, "os", os_with(open=open_))
    no_model_load(monkeypatch)
    code, _, err = cli(capsys, *eval_args(out, model_dir))
    assert code == 2
    line = one_error_line(err)
    assert "not writable" in line and str(out) in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the simulated test covers it")
def test_read_only_out_folder_for_real(tmp_path, model_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    no_model_load(monkeypatch)
    try:
        code, _, err = cli(capsys, *eval_args(out, model_dir))
    finally:
        out.chmod(0o755)
    assert code == 2 and "not writable" in one_error_line(err)


@pytest.mark.parametrize("case", ["existing file", "under a file"])
def test_out_that_cannot_be_a_folder_is_one_line_before_the_model_loads(tmp_path, model_dir, capsys, monkeypatch,
                                                                         case):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if case == "existing file" else tmp_path / "f" / "sub"
    no_model_load(monkeypatch)
    code, _, err = cli(capsys, *eval_args(out, model_dir))
    assert code == 2
    line = one_error_line(err)
    assert str(tmp_path / "f") in line and "is a file" in line


# ----- damaged results files -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["{}", "5", "[1, 2]", '"row"', "{not json"])
def test_malformed_row_names_the_file_and_line(tmp_path, model_dir, capsys, monkeypatch, bad):
    out = tmp_path / "out"
    out.mkdir()
    good = json.dumps({"config": "dense", "task": "passkey", "haystack": "repeat", "length": 256, "sample": 0})
    (out / "results.jsonl").write_text(f"{good}\n{bad}\n")
    no_model_load(monkeypatch)
    code, _, err = cli(capsys, *eval_args(out, model_dir))
    assert code == 2
    assert f"{out / 'results.jsonl'}:2" in one_error_line(err)


def test_resume_after_a_truncated_last_line_writes_whole_lines(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    assert cli(capsys, *eval_args(out, model_dir))[0] == 0
    path = out / "results.jsonl"
    path.write_text(path.read_text()[:-20])  # the last row cut short, without its newline
    code, _, err = cli(capsys, *eval_args(out, model_dir))
    assert code == 0 and "1 input(s) evaluated, 3 row(s) reused" in err, err
    assert_each_cell_once(out)
    code, _, err = cli(capsys, *eval_args(out, model_dir))
    assert "0 input(s) evaluated, 4 row(s) reused" in err, err


def test_rows_duplicated_by_an_older_version_count_once(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    assert cli(capsys, *eval_args(out, model_dir))[0] == 0
    path = out / "results.jsonl"
    path.write_text(path.read_text() * 2)  # two unlocked runs of an older version each wrote every cell
    code, _, err = cli(capsys, *eval_args(out, model_dir))
    assert code == 0 and "0 input(s) evaluated, 4 row(s) reused" in err, err
    summary = (out / "summary.csv").read_text().splitlines()
    n = summary[0].split(",").index("n")
    assert [row.split(",")[n] for row in summary[1:]] == ["2", "2"]  # 2 samples per config, not 4


# ----- a killed conversion -----------------------------------------------------------------------

KILLED_CONVERSION = """
    import pathlib, sys, time
    import transformers
    from attnsieve import models

    root, started = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])

    def source(work):  # the GGUF is written into the work folder, as the embedded model's is
        (work / "m.gguf").write_bytes(b"GGUF" + bytes(1 << 20))
        return work / "m.gguf"

    def slow_load(*args, **kwargs):  # conversion has started writing; it is killed here
        started.touch()
        time.sleep(600)

    transformers.AutoTokenizer.from_pretrained = slow_load
    models._cached_folder("m", root, source)
"""


def test_sigkill_during_conversion_leaves_orphans_the_next_conversion_removes(tmp_path, monkeypatch):
    root, started = tmp_path / "cache", tmp_path / "started"
    proc = spawn(KILLED_CONVERSION, str(root), str(started))
    wait_for(started, proc)
    proc.kill()
    proc.wait()
    orphans = sorted(p.name.split("-")[0] for p in root.iterdir() if p.name.startswith("."))
    assert orphans == [".gguf", ".tmp"], sorted(os.listdir(root))
    other = root / ".gguf-other-abcdefgh"  # a conversion of another model, running now: left alone
    other.mkdir()

    def convert(gguf: Path, target: Path) -> None:
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / models._DONE).write_text(models._manifest(target, gguf.name))

    monkeypatch.setattr(models, "_convert_gguf", convert)
    folder = models._cached_folder("m", root, lambda work: work / "m.gguf")
    assert models._cache_problem(folder) is None
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert left == [other.name], left
