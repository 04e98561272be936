"""Simulated annotators in the style of AlpacaFarm.

A simulated annotator sees only what a human sees (the prompt and the responses in
the presented order), judges them with a hidden utility plus noise and biases, and
labels through the feedback store's `next_task` / `submit`, the same path human
annotators use: an A/B choice with a strength for a comparison, an order for a
ranking of K responses. The utility is the task's gold utility; it never reaches
the store, the labels or the exports.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    # Type only: crowd must not import feedback at run time (feedback depends on crowd).
    from rlhfkit.feedback.store import FeedbackStore

Utility = Callable[[str, str], float]
KINDS = ("careful", "noisy", "spammer", "adversarial")
# The pools shipped with rlhfkit, by name (a file src/rlhfkit/crowd/pools/NAME.yaml).
SHIPPED_POOLS = ("default", "crowd10")


@dataclass(frozen=True)
class AnnotatorProfile:
    """How one simulated annotator judges.

    Honest kinds (careful, noisy) prefer the response of higher utility, then flip that
    preference with `flip_prob`; adversarial annotators invert it first. Before judging,
    `position_bias` is the chance to pick the left response, `length_bias` the chance
    to pick the longer one (in characters) and `verbosity_bias` the chance to pick the
    one with more lines (more list entries, more rambling), whatever their utility.
    Spammers ignore the content: left with `position_bias`, else a coin flip. Strength grows with the utility
    difference: 1 up to `strength_cuts[0]`, 2 up to `strength_cuts[1]`, else 3 (the
    defaults suit utilities in [-1, 1] such as the top-5 gold utility).
    """

    name: str
    kind: str = "careful"
    flip_prob: float = 0.25
    length_bias: float = 0.0
    position_bias: float = 0.0
    verbosity_bias: float = 0.0
    tie_margin: float = 0.0
    strength_cuts: tuple[float, float] = (0.15, 0.4)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"annotator {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        for field in ("flip_prob", "length_bias", "position_bias", "verbosity_bias"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"annotator {self.name!r}: {field} must be in [0, 1], got {value}")
        if self.tie_margin < 0:
            raise ValueError(f"annotator {self.name!r}: tie_margin must be >= 0")


def default_pool() -> list[AnnotatorProfile]:
    """The built-in crowd (pools/default.yaml): seven honest annotators and two spammers.

    Honest flip rates are 0.20-0.30 (mean 0.25); two have a length bias of 0.15 and two a
    position bias of 0.10. One spammer answers at random, the other always picks left.
    """
    return load_pool("default")


# YAML keys of one annotator, and of its `biases` mapping, with the profile field each sets.
_POOL_KEYS = {
    "name": "name",
    "type": "kind",
    "noise": "flip_prob",
    "tie_margin": "tie_margin",
    "biases": None,
}
_BIAS_KEYS = {"length": "length_bias", "position": "position_bias", "verbosity": "verbosity_bias"}


def load_pool(source: str | Path) -> list[AnnotatorProfile]:
    """Annotator profiles from a pool YAML file, or a shipped pool by name (SHIPPED_POOLS).

    The file holds `annotators:`, a list of mappings with `name`, `type` (careful, noisy,
    adversarial, spammer), `noise` (flip rate), optional `biases: {length, position,
    verbosity}` and `tie_margin`. Errors name the file, the annotator and the field.
    """
    if isinstance(source, str) and source in SHIPPED_POOLS:
        where = f"pool {source!r}"
        text = resources.files("rlhfkit.crowd").joinpath("pools", f"{source}.yaml").read_text("utf-8")
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ValueError(f"{where}: pool file not found (shipped pools: {', '.join(SHIPPED_POOLS)})")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotators"), list) or not data["annotators"]:
        raise ValueError(f"{where}: expected a mapping with a non-empty list under 'annotators'")
    pool = [_profile(where, i, raw) for i, raw in enumerate(data["annotators"])]
    names = [p.name for p in pool]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}: annotator names must be unique, repeated: {', '.join(duplicates)}")
    return pool


def _profile(where: str, index: int, raw: Any) -> AnnotatorProfile:
    """One YAML annotator entry as a profile; ValueError names the file, annotator and field."""
    label = f"{where}: annotators[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{label}: expected a mapping, got {type(raw).__name__}")
    if isinstance(raw.get("name"), str) and raw["name"].strip():
        label = f"{where}: annotator {raw['name']!r}"
    else:
        raise ValueError(f"{label}: field 'name' must be a non-empty string")
    unknown = sorted(set(raw) - set(_POOL_KEYS))
    if unknown:
        raise ValueError(f"{label}: unknown field {unknown[0]!r} (allowed: {', '.join(_POOL_KEYS)})")
    if "type" not in raw:
        raise ValueError(f"{label}: field 'type' is missing (one of {', '.join(KINDS)})")
    values: dict[str, Any] = {}
    for key, field in _POOL_KEYS.items():
        if field is not None and key in raw:
            values[field] = raw[key]
    biases = raw.get("biases") or {}
    if not isinstance(biases, dict):
        raise ValueError(f"{label}: field 'biases' must be a mapping of {', '.join(_BIAS_KEYS)}")
    unknown = sorted(set(biases) - set(_BIAS_KEYS))
    if unknown:
        raise ValueError(f"{label}: unknown field 'biases.{unknown[0]}' (allowed: {', '.join(_BIAS_KEYS)})")
    values.update({_BIAS_KEYS[key]: value for key, value in biases.items()})
    for key, value in [*((k, raw[k]) for k in ("noise", "tie_margin") if k in raw), *biases.items()]:
        if isinstance(value, bool) or not isinstance(value, int | float):
            shown = key if key in raw else f"biases.{key}"
            raise ValueError(f"{label}: field {shown!r} must be a number, got {value!r}")
    try:
        return AnnotatorProfile(**values)
    except ValueError as exc:
        # The profile names its own fields; say which YAML key that is.
        yaml_names = {
            "kind": "type",
            "flip_prob": "noise",
            **{v: f"biases.{k}" for k, v in _BIAS_KEYS.items()},
        }
        message = str(exc)
        for field, key in yaml_names.items():
            message = message.replace(f"{field} must", f"field {key!r} must")
        raise ValueError(f"{where}: {message}") from None


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
    # Drawn only for a verbosity-biased annotator, so the other profiles' streams stay as they were.
    if profile.verbosity_bias and rng.random() < profile.verbosity_bias:
        lines_left, lines_right = (sum(1 for x in r.splitlines() if x.strip()) for r in (left, right))
        if lines_left != lines_right:
            return ("left" if lines_left > lines_right else "right"), 1
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


def rank(
    profile: AnnotatorProfile,
    prompt: str,
    responses: Sequence[str],
    utility: Utility,
    rng: random.Random,
) -> list[int]:
    """The order (presented positions, best first) that `profile` gives K presented responses.

    The annotator compares every pair as in `judge` (same noise and biases, the earlier
    position shown left) and orders by wins, a tie counting half; equal counts are broken
    at random. So a ranking of K carries the noise of C(K, 2) comparisons, partly evened
    out by their transitivity, as when a person sorts a list by looking at two at a time.
    A spammer shuffles (or keeps the shown order with `position_bias`).
    """
    k = len(responses)
    if k < 2:
        raise ValueError(f"a ranking shows at least 2 responses, got {k}")
    if profile.kind == "spammer":
        order = list(range(k))
        if rng.random() >= profile.position_bias:
            rng.shuffle(order)
        return order
    wins = [0.0] * k
    for i in range(k):
        for j in range(i + 1, k):
            choice, _ = judge(profile, prompt, (responses[i], responses[j]), utility, rng)
            if choice == "tie":
                wins[i] += 0.5
                wins[j] += 0.5
            else:
                wins[i if choice == "left" else j] += 1.0
    draws = [rng.random() for _ in range(k)]
    return sorted(range(k), key=lambda i: (-wins[i], draws[i]))


def answer(profile: AnnotatorProfile, task: Any, utility: Utility, rng: random.Random) -> dict[str, Any]:
    """The answer `profile` submits for a leased task: a comparison or a ranking."""
    if task.task_type == "ranking":
        return {"ranking": rank(profile, task.prompt, task.responses, utility, rng)}
    if task.task_type != "comparison":
        raise ValueError(f"simulated annotators answer comparisons and rankings, not {task.task_type!r}")
    choice, strength = judge(profile, task.prompt, task.responses, utility, rng)
    return {"choice": choice, "strength": strength}


def simulate_annotation(
    store: FeedbackStore,
    project_id: int,
    pool: Sequence[AnnotatorProfile],
    utility: Utility,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Let the pool label the project round-robin through the store until no one gets a task.

    `store` is a FeedbackStore or anything with its add_annotator / next_task / submit
    (`rlhfkit.feedback.client.HttpAnnotators` labels over HTTP).

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
            reply = answer(profile, task, utility, rngs[profile.name])
            store.submit(task.token, ids[profile.name], reply, task_type=task.task_type)
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
