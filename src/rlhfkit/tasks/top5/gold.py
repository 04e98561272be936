"""The hidden gold utility of the top-5 task.

Used only to simulate annotators and to evaluate; training never imports it.
A perfect answer is a numbered list of exactly five distinct items of the requested
topic and nothing else; it scores 1.0.
"""

from __future__ import annotations

import re
from functools import lru_cache

from rlhfkit.tasks.top5.catalog import Topic, load_catalog, normalise_item

_NUMBERED = re.compile(r"^\s*(\d+)\.\s+(\S.*)$")

COUNT_PENALTY = 0.15  # per item above or below five
DUPLICATE_PENALTY = 0.2  # per repeated item
OFF_TOPIC_PENALTY = 0.1  # per listed item that is not of the requested topic
RAMBLING_PENALTY = 0.1  # per line that is not a list item
NUMBERING_PENALTY = 0.05  # numbering that is not 1, 2, 3, ...


@lru_cache(maxsize=1)
def _phrase_index() -> list[tuple[str, Topic]]:
    # Longest phrase first, so "horror films" never shadows a longer phrase containing it.
    return sorted(((t.phrase.lower(), t) for t in load_catalog()), key=lambda x: -len(x[0]))


def topic_of(prompt: str) -> Topic | None:
    """The topic whose phrase appears in the prompt, if any."""
    text = prompt.lower()
    for phrase, topic in _phrase_index():
        if phrase in text:
            return topic
    return None


def score_parts(prompt: str, response: str) -> dict[str, float]:
    """The components of the gold utility, for inspection and tests."""
    topic = topic_of(prompt)
    valid = {normalise_item(i) for i in topic.items} if topic else set()
    lines = [line for line in response.strip().splitlines() if line.strip()]
    numbers, items, other_lines = [], [], 0
    for line in lines:
        m = _NUMBERED.match(line)
        if m:
            numbers.append(int(m.group(1)))
            items.append(normalise_item(m.group(2)))
        else:
            other_lines += 1
    distinct = list(dict.fromkeys(items))
    on_topic = [i for i in distinct if i in valid]
    return {
        "relevance": min(len(on_topic), 5) / 5,
        "n_items": len(items),
        "duplicates": len(items) - len(distinct),
        "off_topic": len([i for i in items if i not in valid]),
        "other_lines": other_lines,
        "bad_numbering": float(numbers != list(range(1, len(numbers) + 1))),
    }


def gold_utility(prompt: str, response: str) -> float:
    """Gold score in [-1, 1] of a response to a top-5 request."""
    p = score_parts(prompt, response)
    score = (
        p["relevance"]
        - COUNT_PENALTY * abs(p["n_items"] - 5)
        - DUPLICATE_PENALTY * p["duplicates"]
        - OFF_TOPIC_PENALTY * p["off_topic"]
        - RAMBLING_PENALTY * p["other_lines"]
        - NUMBERING_PENALTY * p["bad_numbering"]
    )
    return max(-1.0, min(1.0, score))
