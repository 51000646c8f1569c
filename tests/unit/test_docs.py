"""The docs: the generated reference pages match the code, the site's navigation names pages that exist, and
README.md stays a front page (at most 300 lines) whose relative links all lead somewhere."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from tunelab import docs_ref
from tunelab.config.keys import all_keys, dataclass_of
from tunelab.config.schema import Config

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference"
README_MAX_LINES = 300


@pytest.mark.parametrize("name", sorted(docs_ref.PAGES))
def test_generated_page_is_current(name):
    page = REFERENCE / name
    assert page.is_file(), f"docs/reference/{name} is missing: run `{docs_ref.COMMAND}` and commit it"
    current = docs_ref.PAGES[name]()
    assert page.read_text(encoding="utf-8") == current, (
        f"docs/reference/{name} is stale (the code changed): run `{docs_ref.COMMAND}` (or `make docs`) and "
        "commit the page")


def _fields(cls: type = Config, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f
        sub = dataclass_of(hints[f.name])
        if sub is not None:
            yield from _fields(sub, prefix + f.name + ".")


def test_every_recipe_key_has_help_and_is_in_the_reference():
    missing = [key for key, f in _fields() if not str(f.metadata.get("help", "")).strip()]
    assert not missing, f"keys without metadata help in src/tunelab/config/schema.py: {missing}"
    page = docs_ref.recipe_markdown()
    listed = set(re.findall(r"^\| `([^`]+)` \|", page, flags=re.M))
    unlisted = [k for k in all_keys() if k not in {x.replace("[]", "") for x in listed}]
    assert not unlisted, f"keys missing from the recipe reference: {unlisted}"


def test_recipe_reference_shows_choices_defaults_and_dotted_keys():
    page = docs_ref.recipe_markdown()
    assert "| `train.mode` | `full`, `lora`, `head`, `freeze` | `\"lora\"` |" in page
    assert "| `train.lr` | float | `0.0001` |" in page
    assert "| `lora.targets` | list of str | `[\"q_proj\", \"v_proj\"]` |" in page
    assert "| `data.validation_size` | count (int) or fraction (float below 1) | `0` |" in page
    assert "| `instruct.tasks[].templates[].prompt` |" in page
    for source in ("data.train", "data.validation", "data.test", "instruct.tasks[].source"):
        assert f"| `{source}.path` | str or null | `null` |" in page


def test_cli_reference_lists_every_command_and_option():
    from tunelab.cli import build_parser

    page = docs_ref.cli_markdown()
    seen = 0

    def walk(parser: argparse.ArgumentParser) -> None:
        nonlocal seen
        assert f"\n## {parser.prog}\n" in page or f"\n### {parser.prog}\n" in page, parser.prog
        seen += 1
        for action in parser._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"`{opt}" in page or f", {opt}" in page, f"{parser.prog} {opt}"
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    assert seen >= 14  # tunelab, 12 commands, data show


def test_cli_reference_does_not_depend_on_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = docs_ref.cli_markdown()
    monkeypatch.setenv("COLUMNS", "300")
    assert docs_ref.cli_markdown() == narrow


def test_check_mode_names_a_stale_page(tmp_path, capsys):
    assert docs_ref.main(["--out", str(tmp_path)]) == 0
    assert docs_ref.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "cli.md").write_text("old\n")
    assert docs_ref.main(["--out", str(tmp_path), "--check"]) == 1
    assert "cli.md: stale (run python -m tunelab.docs_ref)" in capsys.readouterr().err


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    return []


def test_every_page_in_the_nav_exists_and_every_page_is_in_the_nav():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = ROOT / cfg.get("docs_dir", "docs")
    nav = _nav_pages(cfg["nav"])
    assert nav, "mkdocs.yml has no nav"
    assert [p for p in nav if not (docs / p).is_file()] == [], "pages in mkdocs.yml's nav that do not exist"
    pages = sorted(str(p.relative_to(docs)) for p in docs.rglob("*.md"))
    assert [p for p in pages if p not in nav] == [], "pages under docs/ that mkdocs.yml's nav leaves out"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; at most {README_MAX_LINES}: move the detail into docs/")


def _relative_links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    targets += re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, flags=re.M)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_relative_links_point_to_existing_files():
    links = _relative_links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert links, "README.md links to no docs page"
    broken = [t for t in links if not (ROOT / t.split("#", 1)[0]).exists()]
    assert broken == [], f"README.md links to files that do not exist: {broken}"


def test_relative_links_are_found():
    text = "[a](docs/x.md) [b](https://x.org) `[c](no.md)` [d](#here) [e](docs/y.md#part)\n```\n[f](z.md)\n```"
    assert _relative_links(text) == ["docs/x.md", "docs/y.md#part"]
