"""The README stays a map and the docs stay linked: the README is short and shows the architecture
early, docs/ holds the pages, every relative link points at a file that exists, and the docs speak
about the code, not about how it came to be."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, ROOT / "bench" / "README.md", *PAGES]

# [text](target) — a target without a scheme is a path relative to the file that holds the link
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    return [target for target in LINK.findall(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]


def test_link_finder_keeps_relative_paths_only():
    text = "[a](docs/x.md) [b](https://example.org) [c](#usage) [d](../bench/README.md#results) [e](mailto:x@y)"
    assert relative_links(text) == ["docs/x.md", "../bench/README.md#results"]


def test_readme_is_a_short_map():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"
    headings = [number for number, line in enumerate(lines, 1) if line.strip() == "## Architecture"]
    assert headings and headings[0] <= 150, "README.md needs '## Architecture' within its first 150 lines"


def test_docs_folder_has_the_pages():
    names = {page.name for page in PAGES}
    assert len(names) >= 4, names
    assert {"data.md", "stages.md", "rl.md", "scaling.md", "evaluation.md", "architecture.md"} <= names, names


def test_every_relative_link_resolves():
    broken = []
    for document in DOCUMENTS:
        for target in relative_links(document.read_text()):
            path = target.split("#", 1)[0]
            if path and not (document.parent / path).exists():
                broken.append(f"{document.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_docs_carry_no_ticket_history():
    pattern = re.compile(r"\bissue\s*#?\d+|\bticket\b|\bsession\b", re.IGNORECASE)
    found = [f"{document.relative_to(ROOT)}:{number}: {line.strip()}"
             for document in DOCUMENTS
             for number, line in enumerate(document.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "history in the docs:\n" + "\n".join(found)


def test_architecture_page_lists_every_layer_of_the_import_test():
    from tests.unit.test_imports import LAYERS

    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [f"{layer}: {module}" for layer, modules in LAYERS for module in modules if f"`{module}`" not in page]
    assert not missing, "docs/architecture.md does not name: " + ", ".join(missing)
