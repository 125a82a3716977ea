"""The docs stay true: links point to files that exist, `ldm.…` names resolve, named tests exist,
and the CLI page lists exactly the commands and options the parser has."""

import argparse
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md", ROOT / "ARCHITECTURE.md"]


def resolve(name: str):
    """``ldm.a.b.c`` → the object, importing the longest module prefix and getting the rest as attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_names_and_tests_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    for name in re.findall(r"`(ldm(?:\.\w+)+)`", text):
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            pytest.fail(f"{page.name}: `{name}` does not resolve ({e})")
    for path, test in re.findall(r"(tests/test_\w+\.py)::(\w+)", text):
        assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M), f"{page.name}: no {test} in {path}"


def test_cli_page_matches_the_parser():
    from ldm.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    text = (ROOT / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"^### `ldm ([\w-]+)`\n(.*?)(?=^#|\Z)", text, re.M | re.S))
    assert set(sections) == set(commands), "commands missing from or unknown to docs/cli.md"
    for name, body in sections.items():
        options = {s for a in commands[name]._actions for s in a.option_strings}
        inherited = options | ({s for a in commands["txt2img"]._actions for s in a.option_strings}
                               if body.startswith("As `txt2img`") else set())
        config_fields = name in ("train", "train-vae") and "config field" in body
        for option in re.findall(r"`(--[\w-]+)", body):
            if option not in inherited and not config_fields:
                pytest.fail(f"docs/cli.md: ldm {name} has no option {option}")
        for option in options - {"-h", "--help"}:
            if not body.startswith("As `txt2img`"):
                assert option in body, f"docs/cli.md: ldm {name}'s {option} is not documented"
