"""mkdocs hook: writes generated content into the pages at build time, so nothing is kept by hand twice.

A page holds a placeholder such as

    <!-- generated: methods family=sparse -->

and the build replaces it with the output of the same function the CLI prints it with
(`attnsieve methods --markdown --family sparse`). Placeholders:

- `methods [family=F]`: the methods table (`methods --markdown [--family F]`)
- `method-params [family=F]`: one parameter table per method (`methods --markdown --params`)
- `policies`: the KV-policy table (`policies --markdown`)
- `policy-params`: one parameter table per policy (`policies --markdown --params`)
- `cli`: the command-line reference, read from the parser (every command's usage and options)

An unknown placeholder or argument fails the build.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the checkout being documented, even where another copy is installed
    sys.path.insert(0, str(ROOT))

PLACEHOLDER = re.compile(r"<!--\s*generated:\s*([\w-]+)((?:\s+\w+=[\w-]+)*)\s*-->")


def _methods(family: str | None = None) -> str:
    from attnsieve.cli import _method_rows, methods_markdown

    return methods_markdown(_method_rows(family))


def _method_params(family: str | None = None) -> str:
    from attnsieve.cli import _method_rows, params_markdown

    return params_markdown(_method_rows(family))


def _policies() -> str:
    from attnsieve.cache import describe_policy, policy_names
    from attnsieve.cli import policies_markdown

    return policies_markdown([describe_policy(n) for n in policy_names()])


def _policy_params() -> str:
    from attnsieve.cache import describe_policy, policy_names
    from attnsieve.cli import params_markdown

    return params_markdown([describe_policy(n) for n in policy_names()], "help")


def _cli() -> str:
    from attnsieve.cli import cli_markdown

    return cli_markdown()


GENERATORS = {"methods": _methods, "method-params": _method_params, "policies": _policies,
              "policy-params": _policy_params, "cli": _cli}


def render(markdown: str, where: str = "page") -> str:
    """The page with every placeholder replaced by its generated Markdown."""

    def one(match: re.Match) -> str:
        name, args = match.group(1), dict(a.split("=", 1) for a in match.group(2).split())
        if name not in GENERATORS:
            raise ValueError(f"{where}: unknown generated content {name!r}; known: {', '.join(GENERATORS)}")
        try:
            return GENERATORS[name](**args)
        except TypeError as e:
            raise ValueError(f"{where}: bad arguments {args} for generated content {name!r}: {e}") from None

    return PLACEHOLDER.sub(one, markdown)


def on_page_markdown(markdown, page, config, files):
    return render(markdown, page.file.src_uri)
