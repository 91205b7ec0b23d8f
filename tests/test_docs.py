"""The reference pages say what the code does: every option of every command, every route and every job field
is documented, and nothing documented is gone."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from test_server import client

from img2vid.cli import build_parser

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _mentions(text: str, word: str) -> bool:
    return re.search(re.escape(word) + r"(?![\w-])", text) is not None


def test_every_command_and_option_is_in_the_cli_and_server_docs():
    cli, api = (DOCS / "cli.md").read_text(), (DOCS / "api.md").read_text()
    options = set()
    for name, parser in _commands().items():
        assert _mentions(cli, f"img2vid {name}"), name
        page, page_name = (api, "api.md") if name == "serve" else (cli, "cli.md")
        flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
        for option in sorted(flags - {"--help"}):
            assert _mentions(page, option), f"img2vid {name} {option} is not in {page_name}"
        options |= flags
    stale = set(re.findall(r"--[a-z][\w-]*", cli + api)) - options
    assert not stale, f"documented options that no command has: {sorted(stale)}"


def test_every_route_and_job_field_is_in_the_api_docs(tmp_path):
    api = (DOCS / "api.md").read_text()
    with client(tmp_path) as c:
        spec = c.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        documented = path.replace("{job_id}", "{id}")
        for method in methods:
            route = re.escape(f"`{method.upper()} {documented}") + r"[`?\s]"
            assert re.search(route, api), f"{method.upper()} {path} is not in api.md"
    form = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    for field in form["properties"]:
        assert _mentions(api, field), f"POST /v1/jobs field {field} is not in api.md"
