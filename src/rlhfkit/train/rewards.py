"""Programmable rewards: a weighted sum of reward functions, configured in YAML by name.

A reward function is any callable `fn(prompts: list, responses: list[str]) -> list[float]`
(one float per response). A config lists terms as `{fn, weight, kwargs}`, where `fn` is a
built-in name or an import path "module:function" (called with `**kwargs`):

    grpo:
      rewards:
        - {fn: reward_model}                     # the trained RM at RUN/rm/model
        - {fn: top5_format, weight: 0.5}         # verifiable: exactly five numbered lines
        - {fn: repetition_penalty, weight: 1.0}  # penalty terms discourage reward hacking
        - {fn: mypackage.rewards:politeness, kwargs: {strict: true}}

The built-in `top5_format` is written from the task's *format rules*; it never consults
the hidden gold utility, which is kept away from training.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import RewardSpec, import_callable
from rlhfkit.models.heads import sequence_scores
from rlhfkit.models.loading import load_reward_model, load_tokenizer
from rlhfkit.models.tokenizer import completion_token_ids, prompt_token_ids
from rlhfkit.rollout.batch import right_pad
from rlhfkit.train.distributed import loading_whole

RewardFunction = Callable[[list, list[str]], list[float]]

_NUMBERED_LINE = re.compile(r"^\s*(\d+)\.\s+(\S.*?)\s*$")


def top5_format(prompts: Sequence[Any], responses: Sequence[str], n_items: int = 5) -> list[float]:
    """1.0 for exactly `n_items` lines numbered 1..n with distinct non-empty items, else 0.0."""
    out = []
    for response in responses:
        lines = [line for line in response.strip().splitlines() if line.strip()]
        matches = [_NUMBERED_LINE.match(line) for line in lines]
        ok = len(lines) == n_items and all(matches)
        if ok:
            numbers = [int(m.group(1)) for m in matches]
            items = [m.group(2).lower() for m in matches]
            ok = numbers == list(range(1, n_items + 1)) and len(set(items)) == n_items
        out.append(1.0 if ok else 0.0)
    return out


def length_penalty(prompts: Sequence[Any], responses: Sequence[str], max_words: int = 40) -> list[float]:
    """-(words beyond `max_words`) / max_words: zero for responses within the budget."""
    return [-max(0, len(r.split()) - max_words) / max_words for r in responses]


def repetition_penalty(prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """-(share of lines that repeat an earlier line), numbering and case ignored."""
    out = []
    for response in responses:
        lines = [line for line in response.strip().splitlines() if line.strip()]
        if not lines:
            out.append(0.0)
            continue
        keys = []
        for line in lines:
            m = _NUMBERED_LINE.match(line)
            keys.append((m.group(2) if m else line).strip().lower())
        out.append(-(len(keys) - len(set(keys))) / len(keys))
    return out


class RewardModelFunction:
    """The trained reward model as a reward function over (prompt, response text)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", max_length: int = 256):
        self.tokenizer = load_tokenizer(path)
        with loading_whole():  # frozen, never prepared: whole on every process (ZeRO-3)
            self.model = load_reward_model(path, self.tokenizer.pad_token_id).to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.max_length = device, max_length

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], responses: Sequence[str], batch_size: int = 64) -> list[float]:
        """RM score of each response, tokenised the way the RM was trained (completion + EOS)."""
        rows = [
            (prompt_token_ids(self.tokenizer, p) + completion_token_ids(self.tokenizer, r))[: self.max_length]
            for p, r in zip(prompts, responses, strict=True)
        ]
        scores: list[float] = []
        for start in range(0, len(rows), batch_size):
            ids, mask = right_pad(rows[start : start + batch_size], self.tokenizer.pad_token_id)
            scores += sequence_scores(self.model, ids.to(self.device), mask.to(self.device)).tolist()
        return scores


BUILTINS: dict[str, RewardFunction] = {
    "top5_format": top5_format,
    "length_penalty": length_penalty,
    "repetition_penalty": repetition_penalty,
}


def import_reward_function(spec: str) -> RewardFunction:
    """The callable named by "module:function"; a ValueError that says what is wrong otherwise."""
    expected = f"a built-in ({', '.join(['reward_model', *BUILTINS])}) or an import path 'module:function'"
    return import_callable(spec, "reward function", expected)


@dataclass
class RewardTerm:
    """One configured term: a name for logging, its weight, and the bound function."""

    name: str
    weight: float
    fn: RewardFunction


def build_reward_functions(
    specs: Sequence[RewardSpec], reward_model_path: str | Path | None = None, device: Any = "cpu"
) -> list[RewardTerm]:
    """Resolve configured reward specs to callables (the reward model is loaded once)."""
    terms = []
    for spec in specs:
        if spec.fn == "reward_model":
            if reward_model_path is None:
                raise ValueError(
                    "reward function 'reward_model' needs a trained reward model (run `rlhfkit rm`)"
                )
            _check_kwargs(spec, RewardModelFunction, reward_model_path, device)
            fn: RewardFunction = RewardModelFunction(reward_model_path, device, **spec.kwargs)
        else:
            function = BUILTINS.get(spec.fn) or import_reward_function(spec.fn)
            _check_kwargs(spec, function, [], [])
            fn = partial(function, **spec.kwargs)
        terms.append(RewardTerm(spec.fn, spec.weight, fn))
    return terms


def _check_kwargs(spec: RewardSpec, function: Callable, *args: Any) -> None:
    """Refuse `kwargs` that `function` does not take, when the stage starts rather than at its
    first reward."""
    signature = inspect.signature(function)
    try:
        signature.bind(*args, **spec.kwargs)
    except TypeError as exc:
        raise ValueError(
            f"reward function {spec.fn!r}: kwargs {spec.kwargs}: {exc} (it takes {signature})"
        ) from None


def needs_reward_model(specs: Sequence[RewardSpec]) -> bool:
    """Whether any term is the trained reward model (so the stage depends on `rm`)."""
    return any(spec.fn == "reward_model" for spec in specs)


def combined_rewards(
    terms: Sequence[RewardTerm], prompts: Sequence[Any], responses: Sequence[str]
) -> tuple[list[float], dict[str, float]]:
    """sum_k weight_k * fn_k(prompts, responses) per response, and each term's batch mean."""
    total = [0.0] * len(responses)
    means: dict[str, float] = {}
    for term in terms:
        values = list(term.fn(list(prompts), list(responses)))
        if len(values) != len(responses):
            raise ValueError(
                f"reward function {term.name!r} returned {len(values)} values for {len(responses)} responses"
            )
        for i, v in enumerate(values):
            v = float(v)
            if not math.isfinite(v):
                raise ValueError(
                    f"reward function {term.name!r} returned a non-finite value {v} at index {i}"
                )
            total[i] += term.weight * v
        means[f"reward/{term.name}"] = sum(values) / max(len(values), 1)
    return total, means
