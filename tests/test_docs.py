"""The front page stays a front page: the README's prose (outside tables, code blocks and headings) is at most 2,000
words, sentences have a median of at most 20 words, no paragraph is over 120 words, `make demo` and `make test` are
within the first 40 lines, and every relative link resolves. The docs/ pages and the notebook's Markdown cells keep
the same sentence and paragraph limits."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
README_WORDS, MEDIAN_SENTENCE, PARAGRAPH = 2000, 20, 120
_SENTENCE_END = re.compile(r"(?<=[.!?])[)\"'*_]*\s+(?=[A-Z`*(\[\"'0-9])")
_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")


def paragraphs(markdown: str) -> list[str]:
    """The prose of a Markdown text, one string per paragraph or list item: fenced code, tables, headings, HTML
    comments and images left out; a link counts as its text."""
    out: list[list[str]] = []
    fenced, current = False, None
    for line in markdown.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced, current = not fenced, None
            continue
        if fenced or not stripped or stripped.startswith(("|", "#", "<!--", "![")) or stripped == "---":
            current = None
            continue
        if current is None or _ITEM.match(line):
            current = []
            out.append(current)
        current.append(_ITEM.sub("", stripped))
    text = [re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", " ".join(p)) for p in out]
    return [t for t in text if t.split()]


def sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(paragraph) if s.split()]


def measure(markdown: str) -> dict:
    paras = paragraphs(markdown)
    lengths = [len(s.split()) for p in paras for s in sentences(p)]
    return {"words": sum(len(p.split()) for p in paras),
            "median_sentence": statistics.median(lengths) if lengths else 0,
            "longest_paragraph": max((len(p.split()), p[:80]) for p in paras) if paras else (0, ""),
            "sentences": len(lengths)}


def test_the_measure_reads_markdown_as_a_reader_does():
    text = ("# Title\n\nOne two three. Four five six seven, e.g. eight.\n\n| a | b |\n|---|---|\n\n```\ncode\n```\n"
            "- An item with a [link](x.md). Another sentence.\n- Second item\n  continues here.\n")
    assert paragraphs(text) == ["One two three. Four five six seven, e.g. eight.",
                                "An item with a link. Another sentence.", "Second item continues here."]
    m = measure(text)
    assert m["words"] == 20 and m["sentences"] == 5 and m["longest_paragraph"][0] == 9


def _notebook_markdown() -> str:
    nb = json.loads((REPO / "Common_Task" / "DeepLense_Classification.ipynb").read_text())
    return "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def test_the_readme_is_a_front_page():
    text = (REPO / "README.md").read_text()
    m = measure(text)
    assert m["words"] <= README_WORDS, m
    assert m["median_sentence"] <= MEDIAN_SENTENCE, m
    assert m["longest_paragraph"][0] <= PARAGRAPH, m
    head = "\n".join(text.splitlines()[:40])
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("name", [p.name for p in DOCS] + ["notebook"])
def test_docs_and_notebook_keep_the_sentence_and_paragraph_limits(name):
    text = _notebook_markdown() if name == "notebook" else (REPO / "docs" / name).read_text()
    m = measure(text)
    assert m["median_sentence"] <= MEDIAN_SENTENCE, m
    assert m["longest_paragraph"][0] <= PARAGRAPH, m


def test_every_docs_page_starts_with_a_two_line_summary():
    for page in DOCS:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), page.name
        summary = paragraphs("\n".join(lines[1:]))[0]
        assert len(sentences(summary)) <= 3 and len(summary.split()) <= 60, (page.name, summary)


def test_every_relative_link_resolves():
    for doc in [REPO / "README.md", *DOCS, REPO / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)}: link to {target} is broken"
