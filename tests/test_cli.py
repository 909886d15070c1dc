"""The command line: JSON shapes, and one-line errors with exit code 2 for bad input.

Commands run in this process (`main([...])`, output captured), so a loaded machine slows them
but never fails them; one test runs `python -m attnsieve` as a user would, without a time limit.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from attnsieve.cli import main
from attnsieve.methods import names

from tiny_models import save_tiny_eval_model


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    def run(*args: str) -> Result:
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def test_python_dash_m_runs_the_cli():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "attnsieve", "methods", "--json"], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert {m["name"] for m in json.loads(res.stdout.strip().splitlines()[-1])["methods"]} == set(names())
    res = subprocess.run([sys.executable, "-m", "attnsieve", "generate", "--prompt", "a", "--prompt-file", "b"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert res.stderr.strip() == "attnsieve: error: give exactly one of --prompt or --prompt-file"


def test_methods_json_lists_the_registry(cli):
    res = cli("methods", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert {m["name"] for m in doc["methods"]} == set(names())
    for m in doc["methods"]:
        assert {"name", "family", "phases", "params"} <= m.keys()
    by = {m["name"]: m for m in doc["methods"]}
    assert by["block-topk"]["family"] == "sparse" and "density" in by["block-topk"]["params"]
    assert by["window"]["params"]["sink"] == 4
    assert {"versions", "threads", "seed"} <= doc.keys()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "--method", "nope", "--prompt", "hi"], "unknown method"),
        (["generate", "--method", "window", "--set", "window=0", "--prompt", "hi"], "window"),
        (["generate", "--method", "window", "--set", "bogus=1", "--prompt", "hi"], "bogus"),
        (["generate", "--method", "window", "--set", "nokey", "--prompt", "hi"], "key=value"),
        (["generate", "--method", "block-topk", "--set", "density=abc", "--prompt", "hi"], "density"),
        (["generate", "--prompt", "a", "--prompt-file", "b"], "exactly one"),
        (["generate"], "exactly one"),
        (["generate", "--prompt-file", "/no/such/file"], "does not exist"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["generate", "--bogus-flag"], "bogus-flag"),
        (["demo", "--density", "1.5"], "density"),
        (["demo", "--density", "0"], "density"),
        (["demo", "--lengths", "10"], "length"),
        (["demo", "--lengths", "abc"], "lengths"),
        (["demo", "--depths", "2"], "depth"),
        (["demo", "--threads", "0"], "threads"),
        (["nosuchcommand"], "nosuchcommand"),
        (["methods", "--markdown", "--family", "nope"], "--family"),
        (["bench", "kernel", "--density", "0"], "density"),
        (["bench", "kernel", "--heads", "3", "--kv-heads", "2"], "kv-heads"),
        (["bench", "kernel", "--method", "dense"], "does not estimate a support"),
        (["bench", "kernel", "--length", "10"], "length"),
        (["bench", "prefill", "--method", "nope"], "unknown method"),
        (["bench", "prefill", "--density", "2"], "density"),
        (["bench", "decode", "--kv", "razor", "--set", "kv_compensation=maybe"], "kv_compensation"),
        (["generate", "--method", "block-topk", "--set", "per_head=maybe", "--prompt", "hi"], "per_head"),
        (["heads", "--lengths", "10"], "lengths"),
        (["heads", "--task", "nope"], "unknown --task"),
        (["heads", "--samples", "0"], "samples"),
        (["heads", "--haystack", "nope"], "haystack"),
        (["heads", "--local-window", "5000", "--lengths", "1024"], "local_window"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, args, needle):
    res = cli(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]
    assert "Traceback" not in res.stderr


def test_prompt_file_messages_name_the_file_and_the_problem(cli, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\xff\xfe" * 10)
    for path, needle in [(tmp_path, "is a folder, not a file"), (binary, "is not UTF-8 text"),
                         (tmp_path / "missing.txt", "does not exist")]:
        res = cli("generate", "--prompt-file", str(path))
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0] and repr(str(path)) in lines[0], res.stderr


def test_cache_pointing_at_a_file_is_one_line(cli, tmp_path, monkeypatch):
    f = tmp_path / "not-a-folder"
    f.write_text("x")
    monkeypatch.setenv("ATTNSIEVE_CACHE", str(f))
    res = cli("generate", "--prompt", "hi")
    assert res.returncode == 2
    assert res.stderr.strip() == f"attnsieve: error: ATTNSIEVE_CACHE {str(f)!r} is a file; the conversion cache " \
        "must be a folder"


def test_bench_kernel_json(cli):
    res = cli("bench", "kernel", "--length", "512", "--density", "0.25", "--heads", "2", "--kv-heads", "1",
              "--head-dim", "32", "--reps", "1", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    fields = {"dense_s", "sparse_s", "speedup", "measured_density", "estimate_s", "versions", "threads", "seed"}
    assert fields <= doc.keys()
    assert 0 < doc["measured_density"] <= 1 and doc["speedup"] > 0


def test_an_unexpected_error_surfaces_as_itself(monkeypatch):
    """A bug inside a command (here a RuntimeError) reaches the user as that error, not as a failure of
    the CLI's own error handling (the Ctrl-C clause once named an exception the vendored click lacks)."""
    import attnsieve.cli as cli

    def boom(rows):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "methods_markdown", boom)
    with pytest.raises(RuntimeError, match="boom"):
        main(["methods", "--markdown"])

RERANK_DOCS = ["the cat sat on the mat all day long", "python is a programming language", "dogs bark loudly at night",
               "rain falls on the green hills in spring"]
RERANK_QUERY = "which one is about programming?"


@pytest.fixture(scope="module")
def rerank_model(tmp_path_factory):
    return str(save_tiny_eval_model(tmp_path_factory.mktemp("tiny") / "model"))


def _docs_file(tmp_path, lines):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _run_rerank(capsys, *args):
    from attnsieve.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_rerank_json_shape(tmp_path, rerank_model, capsys):
    docs = _docs_file(tmp_path, [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(RERANK_DOCS)])
    code, out, err = _run_rerank(capsys, "rerank", "--model", rerank_model, "--query", RERANK_QUERY, "--docs", docs,
                                 "--json", "--top", "3", "--dtype", "float32")
    assert code == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    assert [set(x) for x in doc["ranking"]] == [{"id", "score"}] * 3
    assert {x["id"] for x in doc["ranking"]} <= {f"d{i}" for i in range(4)}
    scores = [x["score"] for x in doc["ranking"]]
    assert scores == sorted(scores, reverse=True)
    for key in ("versions", "threads", "seed", "dtype", "device"):
        assert key in doc
    code, out, err = _run_rerank(capsys, "rerank", "--model", rerank_model, "--query", RERANK_QUERY, "--docs", docs,
                             "--method", "block-topk", "--density", "0.5", "--set", "block_size=16", "--dtype",
                             "float32")
    assert code == 0, err
    assert "d1" in out  # the table lists every document


@pytest.mark.parametrize("lines,args,needle", [
    (None, ["--query", " "], "--query is empty"),
    (None, ["--heads", "best"], "--heads"),
    (None, ["--layers", "middle"], "--layers"),
    (None, ["--method", "linear"], "reads sparse or exact attention"),
    (None, ["--method", "dense", "--density", "0.1"], "without a method"),
    (None, ["--top", "0"], "--top"),
    (['{"id": 1}'], [], "line 1"),
    (["not json"], [], "not JSON"),
    (['{"id": 1, "text": "a"}', '{"id": 1, "text": "b"}'], [], "repeats id 1"),
    ([""], [], "no documents"),
    ([json.dumps({"id": 1, "text": "word " * 2000})], [], "beyond the model's context"),
])
def test_rerank_bad_input_one_line_exit_2(tmp_path, rerank_model, capsys, lines, args, needle):
    docs = _docs_file(tmp_path, lines if lines is not None else [json.dumps({"id": 0, "text": "a b c"})])
    base = {"--query": RERANK_QUERY, "--docs": docs, "--model": rerank_model}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = ["rerank", *itertools.chain.from_iterable(base.items()), "--dtype", "float32"]
    code, _, err = _run_rerank(capsys, *argv)
    lines_err = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines_err) == 1 and needle in lines_err[0], err


def test_rerank_missing_docs_file(tmp_path, capsys):
    code, _, err = _run_rerank(capsys, "rerank", "--query", RERANK_QUERY, "--docs", str(tmp_path / "none.jsonl"))
    assert code == 2 and "is not a file" in err
