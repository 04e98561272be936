"""Simulated annotators in the style of AlpacaFarm.

A simulated annotator sees only what a human sees (the prompt and the two responses
in the presented order), judges them with a hidden utility plus noise and biases,
and labels through the feedback store's `next_task` / `submit_comparison`, the same
path human annotators use. The utility is the task's gold utility; it never reaches
the store, the labels or the exports.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Type only: crowd must not import feedback at run time (feedback depends on crowd).
    from rlhfkit.feedback.store import FeedbackStore

Utility = Callable[[str, str], float]
KINDS = ("careful", "noisy", "spammer", "adversarial")


@dataclass(frozen=True)
class AnnotatorProfile:
    """How one simulated annotator judges.

    Honest kinds (careful, noisy) prefer the response of higher utility, then flip that
    preference with `flip_prob`; adversarial annotators invert it first. Before judging,
    `position_bias` is the chance to pick the left response and `length_bias` the
    chance to pick the longer one, whatever their utility. Spammers ignore the content:
    left with `position_bias`, else a coin flip. Strength grows with the utility
    difference: 1 up to `strength_cuts[0]`, 2 up to `strength_cuts[1]`, else 3 (the
    defaults suit utilities in [-1, 1] such as the top-5 gold utility).
    """

    name: str
    kind: str = "careful"
    flip_prob: float = 0.25
    length_bias: float = 0.0
    position_bias: float = 0.0
    tie_margin: float = 0.0
    strength_cuts: tuple[float, float] = (0.15, 0.4)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"annotator {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        for field in ("flip_prob", "length_bias", "position_bias"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"annotator {self.name!r}: {field} must be in [0, 1], got {value}")
        if self.tie_margin < 0:
            raise ValueError(f"annotator {self.name!r}: tie_margin must be >= 0")


def default_pool() -> list[AnnotatorProfile]:
    """The built-in crowd: seven honest annotators and two spammers.

    Honest flip rates are 0.20-0.30 (mean 0.25); two have a length bias of 0.15 and two a
    position bias of 0.10. One spammer answers at random, the other always picks left.
    """
    return [
        AnnotatorProfile("sim-careful-1", "careful", flip_prob=0.20),
        AnnotatorProfile("sim-careful-2", "careful", flip_prob=0.22),
        AnnotatorProfile("sim-careful-3", "careful", flip_prob=0.25, position_bias=0.10),
        AnnotatorProfile("sim-careful-4", "careful", flip_prob=0.25, length_bias=0.15),
        AnnotatorProfile("sim-noisy-1", "noisy", flip_prob=0.30),
        AnnotatorProfile("sim-noisy-2", "noisy", flip_prob=0.28, length_bias=0.15),
        AnnotatorProfile("sim-noisy-3", "noisy", flip_prob=0.25, position_bias=0.10),
        AnnotatorProfile("sim-spammer-random", "spammer"),
        AnnotatorProfile("sim-spammer-left", "spammer", position_bias=1.0),
    ]


def _other(choice: str) -> str:
    return "right" if choice == "left" else "left"


def judge(
    profile: AnnotatorProfile,
    prompt: str,
    responses: Sequence[str],
    utility: Utility,
    rng: random.Random,
) -> tuple[str, int]:
    """The (choice, strength) that `profile` gives two presented responses."""
    if len(responses) != 2:
        raise ValueError(f"a comparison shows 2 responses, got {len(responses)}")
    left, right = responses
    if profile.kind == "spammer":
        choice = "left" if rng.random() < profile.position_bias else rng.choice(("left", "right"))
        return choice, rng.randint(1, 3)
    if rng.random() < profile.position_bias:
        return "left", 1
    if rng.random() < profile.length_bias and len(left) != len(right):
        return ("left" if len(left) > len(right) else "right"), 1
    diff = utility(prompt, right) - utility(prompt, left)
    if abs(diff) <= profile.tie_margin:
        return "tie", 1
    choice = "right" if diff > 0 else "left"
    if profile.kind == "adversarial":
        choice = _other(choice)
    if rng.random() < profile.flip_prob:
        choice = _other(choice)
    small, medium = profile.strength_cuts
    strength = 1 if abs(diff) <= small else 2 if abs(diff) <= medium else 3
    return choice, strength


def simulate_annotation(
    store: FeedbackStore,
    project_id: int,
    pool: Sequence[AnnotatorProfile],
    utility: Utility,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Let the pool label the project round-robin through the store until no one gets a task.

    Deterministic for a seed (given a store opened with a fixed `seed` too, since the
    store draws the presentation order). `progress` is called after each label with
    the number of labels submitted so far.
    """
    names = [p.name for p in pool]
    if len(set(names)) != len(names):
        raise ValueError(f"annotator names in the pool must be unique: {names}")
    ids = {p.name: store.add_annotator(p.name, kind="simulated") for p in pool}
    # One stream per annotator, so adding an annotator does not change the others' answers.
    rngs = {p.name: random.Random(f"{seed}:{p.name}") for p in pool}
    per_annotator = dict.fromkeys(names, 0)
    n_labels = 0
    while True:
        n_before = n_labels
        for profile in pool:
            task = store.next_task(project_id, ids[profile.name])
            if task is None:
                continue
            choice, strength = judge(profile, task.prompt, task.responses, utility, rngs[profile.name])
            store.submit_comparison(task.token, ids[profile.name], choice, strength)
            per_annotator[profile.name] += 1
            n_labels += 1
            if progress is not None:
                progress(n_labels)
        if n_labels == n_before:
            break
    return {
        "n_labels": n_labels,
        "n_annotators": sum(1 for n in per_annotator.values() if n),
        "per_annotator": per_annotator,
    }
