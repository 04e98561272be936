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

from rlhfkit.config import import_callable

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
    # "module:function" of probes(prompts, seed) -> {kind: [(prompt, better, worse)]}: pairs that
    # differ in one known way, for diagnosing a reward model (evaluation only, like `gold`)
    probes: str | None = None


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


def _resolve(task: Task, field_name: str) -> Callable:
    """The function a task field names as "module:function", or an error naming the task and field."""
    return import_callable(getattr(task, field_name), f"task {task.name!r}: {field_name}")


def resolve_gold(task: Task) -> GoldUtility:
    """The task's gold utility function; only for simulated annotators and evaluation."""
    if not task.gold:
        raise ValueError(f"task {task.name!r} has no gold utility")
    return _resolve(task, "gold")


def resolve_probes(task: Task) -> Callable[[list[str], int], dict[str, list[tuple[str, str, str]]]]:
    """The task's probe-pair builder (see `Task.probes`); only for evaluation."""
    if not task.probes:
        raise ValueError(f"task {task.name!r} has no probe pairs")
    return _resolve(task, "probes")
