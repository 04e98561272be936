"""The top-5 catalog: topics, the phrase that names each, and their real items."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files


@dataclass(frozen=True)
class Topic:
    """One topic: an id, the plural noun phrase used in prompts, and its items."""

    id: str
    phrase: str
    items: tuple[str, ...]


@lru_cache(maxsize=1)
def load_catalog() -> tuple[Topic, ...]:
    """The shipped catalog (catalog.json next to this module)."""
    raw = json.loads((files("rlhfkit.tasks.top5") / "catalog.json").read_text(encoding="utf-8"))
    return tuple(Topic(t["id"], t["phrase"], tuple(t["items"])) for t in raw["topics"])


def normalise_item(text: str) -> str:
    """Case- and space-insensitive form of an item name, for matching."""
    return " ".join(text.lower().replace("*", "").strip(" .;:-").split())
