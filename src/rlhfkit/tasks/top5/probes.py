"""Probe pairs of the top-5 task: a perfect list against the same list with one defect.

Diagnosis only, like the gold utility (and resolved the same way, by the evaluation): each
kind isolates one thing the gold judge rewards, so a reward model's accuracy on a kind says
whether it learned that thing, which a benchmark on natural sample pairs (where answers
differ in many ways at once) cannot tell. Nothing here is ever used for training.
"""

from __future__ import annotations

import random

from rlhfkit.tasks.top5 import format_list
from rlhfkit.tasks.top5.catalog import load_catalog, normalise_item
from rlhfkit.tasks.top5.gold import topic_of

TRAILER = "Hope this helps."
# kind -> what the worse response has that the better one has not
KINDS = {
    "off_topic_item": "one of the five items from another topic",
    "duplicate_item": "one item repeated in place of another",
    "six_items": "a sixth item",
    "four_items": "the fifth item missing",
    "trailing_line": "a closing sentence after the list",
}


def probe_pairs(prompts: list[str], seed: int) -> dict[str, list[tuple[str, str, str]]]:
    """For every kind of defect, (prompt, better, worse) on each prompt whose topic is known."""
    topics = load_catalog()
    rng = random.Random(f"probes-{seed}")
    out: dict[str, list[tuple[str, str, str]]] = {kind: [] for kind in KINDS}
    for prompt in prompts:
        topic = topic_of(prompt)
        if topic is None:
            continue
        six = rng.sample(topic.items, 6)
        good = six[:5]
        own = {normalise_item(i) for i in topic.items}
        other = rng.choice([t for t in topics if t.id != topic.id])
        stray = rng.choice([i for i in other.items if normalise_item(i) not in own])
        off = list(good)
        off[rng.randrange(5)] = stray
        dup = list(good)
        k = rng.randrange(1, 5)
        dup[k] = dup[rng.randrange(k)]
        better = format_list(good)
        worse = {
            "off_topic_item": format_list(off),
            "duplicate_item": format_list(dup),
            "six_items": format_list(six),
            "four_items": format_list(good[:4]),
            "trailing_line": f"{better}\n{TRAILER}",
        }
        for kind, text in worse.items():
            out[kind].append((prompt, better, text))
    return out
