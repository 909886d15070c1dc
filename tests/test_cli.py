"""The command line: JSON shapes, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnsieve.methods import names


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnsieve", *args], capture_output=True, text=True, timeout=timeout)


def test_methods_json_lists_the_registry():
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
        (["bench", "kernel", "--density", "0"], "density"),
        (["bench", "kernel", "--heads", "3", "--kv-heads", "2"], "kv-heads"),
        (["bench", "kernel", "--method", "dense"], "does not estimate a support"),
        (["bench", "kernel", "--length", "10"], "length"),
        (["bench", "prefill", "--method", "nope"], "unknown method"),
        (["bench", "prefill", "--density", "2"], "density"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    res = cli(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]
    assert "Traceback" not in res.stderr


def test_readme_methods_table_matches_the_registry():
    from pathlib import Path

    from attnsieve.cli import methods_markdown
    from attnsieve.methods import describe

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- methods-table:start -->") + len("<!-- methods-table:start -->")
    table = readme[start : readme.index("<!-- methods-table:end -->")].strip()
    assert table == methods_markdown([describe(n) for n in names()]), (
        "README methods table is stale: paste `python -m attnsieve methods --markdown`"
    )


def test_bench_kernel_json():
    res = cli("bench", "kernel", "--length", "512", "--density", "0.25", "--heads", "2", "--kv-heads", "1",
              "--head-dim", "32", "--reps", "1", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    fields = {"dense_s", "sparse_s", "speedup", "measured_density", "estimate_s", "versions", "threads", "seed"}
    assert fields <= doc.keys()
    assert 0 < doc["measured_density"] <= 1 and doc["speedup"] > 0


def test_readme_policies_table_matches_registry():
    from pathlib import Path

    from attnsieve.cache import describe_policy, policy_names
    from attnsieve.cli import policies_markdown

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- policies-table:start -->") + len("<!-- policies-table:start -->")
    table = readme[start : readme.index("<!-- policies-table:end -->")].strip()
    assert table == policies_markdown([describe_policy(n) for n in policy_names()]), (
        "README policies table is stale: paste `python -m attnsieve policies --markdown`"
    )
