"""The documentation site builds without a warning, and what it generates matches the registry and the CLI.

`mkdocs build --strict` (the tools come with the dev extra) fails on any warning: a broken link or
anchor, a missing page, a docstring the API reference cannot render, an unknown placeholder. The
method and policy pages must hold every row `attnsieve methods --markdown` / `policies --markdown`
prints, and the CLI reference every command and option, so a stale page cannot be built.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnsieve.cli import main
from attnsieve.methods.registry import FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def _cli_stdout(capsys, *args: str) -> str:
    try:
        main(list(args))
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    return capsys.readouterr().out


def _rows(markdown: str) -> list[list[str]]:
    """The data rows of the first Markdown table in `markdown`, as lists of cells."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines[2:]]


def _as_html(cell: str) -> str:
    """How Python-Markdown renders a table cell's inline Markdown (code spans and plain text)."""
    parts = cell.split("`")
    return "".join(f"<code>{html.escape(p, quote=False)}</code>" if i % 2 else html.escape(p, quote=False)
                   for i, p in enumerate(parts))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs / mkdocstrings are not installed (they come with the dev extra)")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               NO_MKDOCS_2_WARNING="1")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    warnings = [ln for ln in log.splitlines() if "WARNING" in ln or "ERROR" in ln]
    assert not warnings, "\n".join(warnings)
    return out


def test_the_site_builds_strictly(site):
    for page in ["index.html", "getting-started.html", "concepts.html", "kv-policies.html", "evaluation.html",
                 "benchmarks.html", "tune.html", "extending.html", "cli.html", "api.html", "results/index.html",
                 *(f"methods/{f}.html" for f in FAMILIES)]:
        assert (site / page).is_file(), page
    assert "generated:" not in (site / "methods" / "sparse.html").read_text(), "a placeholder was left in the page"


def test_method_pages_hold_every_row_of_methods_markdown(site, capsys):
    rows = _rows(_cli_stdout(capsys, "methods", "--markdown"))
    index = (site / "methods" / "index.html").read_text()
    pages = {f: (site / "methods" / f"{f}.html").read_text() for f in FAMILIES}
    assert {r[1] for r in rows} <= set(FAMILIES)
    for row in rows:
        for cell in row:
            assert _as_html(cell) in index, (row[0], cell)
            assert _as_html(cell) in pages[row[1]], (row[0], row[1], cell)
    for family in FAMILIES:  # --family gives exactly that family's rows of the full table
        assert _rows(_cli_stdout(capsys, "methods", "--markdown", "--family", family)) == [
            r for r in rows if r[1] == family]


def test_policy_page_holds_every_row_of_policies_markdown(site, capsys):
    rows = _rows(_cli_stdout(capsys, "policies", "--markdown"))
    page = (site / "kv-policies.html").read_text()
    assert rows
    for row in rows:
        for cell in row:
            assert _as_html(cell) in page, (row[0], cell)


def test_cli_reference_lists_every_command_and_option(site):
    import typer

    from attnsieve.cli import app

    page = (site / "cli.html").read_text()
    root = typer.main.get_command(app)

    def walk(cmd, path):
        if getattr(cmd, "commands", None):
            for name, sub in cmd.commands.items():
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, cmd

    commands = list(walk(root, "attnsieve"))
    assert len(commands) >= 9
    for path, cmd in commands:
        assert f"<code>{path}</code>" in page, path
        for param in cmd.params:
            for opt in param.opts:
                assert opt in page, (path, opt)


def test_an_unknown_placeholder_fails_the_build():
    spec = importlib.util.spec_from_file_location("generated_hook", ROOT / "docs" / "hooks" / "generated.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    assert "| `window` |" in hook.render("<!-- generated: methods family=sparse -->")
    with pytest.raises(ValueError, match="unknown generated content"):
        hook.render("<!-- generated: nope -->")
    with pytest.raises(ValueError, match="bad arguments"):
        hook.render("<!-- generated: policies family=sparse -->")
    with pytest.raises(ValueError, match="--family"):
        hook.render("<!-- generated: methods family=nope -->")


def test_readme_is_a_short_landing_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150, "the README is a landing page: move details into docs/"
    # the two commands, exactly
    assert 'pip install -e ".[models]" && python -m attnsieve demo' in readme
    assert 'pip install -e ".[dev,models]" && python -m pytest -q' in readme
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        assert (ROOT / link).is_file(), f"README links to {link!r}, which is not a file"
