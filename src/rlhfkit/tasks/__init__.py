"""Tasks: where prompts, demonstrations and (optionally) a gold utility come from.

A task is a Python module, selected by import path, with a function
`build(seed: int) -> Task`. The gold utility is named by an import path string and is
resolved only by the simulated annotators and the evaluation (never by training), so
importing a task never imports its gold judge.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

GoldUtility = Callable[[str, str], float]


@dataclass
class Task:
    """Everything a run needs from a task."""

    name: str
    train_prompts: list[str]
    heldout_prompts: list[str]
    demonstrations: list[dict[str, str]]
    corpus: list[str] = field(default_factory=list)
    gold: str | None = None  # "module:function" of utility(prompt, response) -> float


def load_task(spec: str, seed: int = 0) -> Task:
    """Import the task module `spec` (e.g. "rlhfkit.tasks.top5") and build it."""
    if spec == "top5":
        spec = "rlhfkit.tasks.top5"
    try:
        module = importlib.import_module(spec)
    except ImportError as exc:
        raise ValueError(f"task {spec!r} cannot be imported: {exc}") from exc
    build = getattr(module, "build", None)
    if build is None:
        raise ValueError(f"task module {spec!r} has no build(seed) function")
    return build(seed)


def resolve_gold(task: Task) -> GoldUtility:
    """The task's gold utility function; only for simulated annotators and evaluation."""
    if not task.gold:
        raise ValueError(f"task {task.name!r} has no gold utility")
    module_name, _, attr = task.gold.partition(":")
    return getattr(importlib.import_module(module_name), attr)
