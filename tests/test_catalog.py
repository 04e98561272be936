"""Validation of the built-in top-5 catalog (``rlhfkit/tasks/top5/catalog.json``)."""

from __future__ import annotations

import json
import re
from functools import cache
from importlib.resources import files

import pytest

MIN_TOPICS = 48
MIN_ITEMS = 18
MAX_ITEMS = 20
MAX_ITEM_CHARS = 28
MAX_ITEM_WORDS = 4

ID_RE = re.compile(r"^[a-z]+(?:_[a-z]+)*$")
# Letters separated by single spaces or hyphens: no digits, commas, colons,
# periods, parentheses, quotes or any other punctuation; ASCII only.
ITEM_RE = re.compile(r"^[A-Za-z]+(?:[ -][A-Za-z]+)*$")
PHRASE_RE = re.compile(r"^[A-Za-z]+(?:[ -][A-Za-z]+)*$")
TEMPLATES = ("Give me the top 5 {}", "What are your five favourite {}?")


@cache
def load_catalog() -> dict:
    resource = files("rlhfkit.tasks.top5") / "catalog.json"
    return json.loads(resource.read_text(encoding="utf-8"))


def topics() -> list[dict]:
    return load_catalog()["topics"]


def test_top_level_shape():
    catalog = load_catalog()
    assert set(catalog) == {"version", "topics"}
    assert catalog["version"] == 1
    assert isinstance(catalog["topics"], list)
    assert len(catalog["topics"]) >= MIN_TOPICS
    for topic in catalog["topics"]:
        assert set(topic) == {"id", "phrase", "items"}, topic.get("id")
        assert isinstance(topic["id"], str)
        assert isinstance(topic["phrase"], str)
        assert isinstance(topic["items"], list)


def test_ids_are_unique_snake_case():
    ids = [t["id"] for t in topics()]
    assert len(ids) == len(set(ids))
    for topic_id in ids:
        assert ID_RE.match(topic_id), topic_id


def test_phrases_are_well_formed_and_unique():
    phrases = [t["phrase"] for t in topics()]
    lowered = [p.lower() for p in phrases]
    assert len(lowered) == len(set(lowered))
    for phrase in phrases:
        assert phrase.isascii(), phrase
        assert not any(ch.isdigit() for ch in phrase), phrase
        assert PHRASE_RE.match(phrase), phrase


def test_no_phrase_is_substring_of_another():
    lowered = [t["phrase"].lower() for t in topics()]
    for i, a in enumerate(lowered):
        for j, b in enumerate(lowered):
            if i != j:
                assert a not in b, (a, b)


@pytest.mark.parametrize("template", TEMPLATES)
def test_prompt_identifies_exactly_one_topic(template):
    cat = topics()
    for topic in cat:
        prompt = template.format(topic["phrase"]).lower()
        hits = [t["id"] for t in cat if t["phrase"].lower() in prompt]
        assert hits == [topic["id"]], (prompt, hits)


def test_item_counts():
    for topic in topics():
        n = len(topic["items"])
        assert MIN_ITEMS <= n <= MAX_ITEMS, (topic["id"], n)


def test_item_format():
    for topic in topics():
        for item in topic["items"]:
            assert isinstance(item, str), (topic["id"], item)
            assert item.isascii(), (topic["id"], item)
            assert ITEM_RE.match(item), (topic["id"], item)
            assert len(item) <= MAX_ITEM_CHARS, (topic["id"], item)
            assert 1 <= len(item.split()) <= MAX_ITEM_WORDS, (topic["id"], item)
            assert item[0].isupper(), (topic["id"], item)
            for bad in ",:.()\"'":
                assert bad not in item, (topic["id"], item)


def test_items_unique_across_catalog():
    seen: dict[str, str] = {}
    for topic in topics():
        for item in topic["items"]:
            key = item.lower()
            assert key not in seen, (item, seen.get(key), topic["id"])
            seen[key] = topic["id"]


def test_no_item_appears_in_any_phrase():
    phrases = [t["phrase"].lower() for t in topics()]
    for topic in topics():
        for item in topic["items"]:
            pattern = re.compile(r"\b" + re.escape(item.lower()) + r"\b")
            for phrase in phrases:
                assert not pattern.search(phrase), (item, phrase)
