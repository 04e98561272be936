"""LLM-as-judge: a local causal LM scores a response from a rubric prompt.

The judge reads `rubric.format(prompt=..., response=...)` and we look at its next-token
distribution instead of sampling a verdict (deterministic, and a probability is a finer
signal than a word):

- mode "yes_no": P(yes) / (P(yes) + P(no)), in [0, 1];
- mode "score":  the expected value of the score tokens "1".."K" under the judge, in [1, K].

An answer's probability is the sum over the distinct first tokens of its common spellings
("yes", "Yes", " yes", " Yes"; "4", " 4"): chat models answer "Yes" as often as "yes", each
a different token, and reading one spelling only can invert the verdict.

It is a reward function (`judge_reward`, for `rewards: [{fn: rlhfkit.eval.llm_judge:judge_reward,
kwargs: {model: PATH}}]`) and an evaluation judge (`evaluate_policies(..., judge="llm",
llm_judge=judge)` reports `llm_score` and win rates under it; `LLMJudge.utility(prompt, response)`
scores one response).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from rlhfkit.models.loading import check_cut_sequences, load_causal_lm, load_tokenizer, position_table
from rlhfkit.models.tokenizer import prompt_token_ids
from rlhfkit.rollout.batch import left_pad
from rlhfkit.rollout.logprobs import position_ids_from_mask

YES_NO_RUBRIC = (
    "Judge the answer to the request.\n"
    "Request: {prompt}\n"
    "Answer:\n{response}\n"
    "Is the answer a helpful, correct and well-formatted reply to the request? Answer yes or no."
)
SCORE_RUBRIC = (
    "Judge the answer to the request.\n"
    "Request: {prompt}\n"
    "Answer:\n{response}\n"
    "Rate the answer from 1 (useless) to {top} (perfect). Reply with one digit."
)
MODES = ("yes_no", "score")
# Stands for the middle of a response cut to fit max_length.
TRUNCATION_MARKER = " ... "
# Query tokens the judge reads when the model does not limit them (its positions are computed).
DEFAULT_MAX_LENGTH = 512


def _text(prompt: Any) -> str:
    """A prompt as text: a string as is, chat messages as their last user turn."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(list(prompt)) if m["role"] == "user"), str(prompt))


class LLMJudge:
    """A causal LM from a local folder (or hub id) that scores (prompt, response) pairs."""

    def __init__(
        self,
        path: str | Path,
        rubric: str | None = None,
        mode: str = "yes_no",
        top_score: int = 5,
        max_length: int | None = None,
        device: torch.device | str = "cpu",
    ):
        """`max_length` caps a query's tokens (a long response is cut in its middle); None: 512, or
        the model's learned position table (GPT-2's n_positions) when that is smaller. A larger
        max_length than the table is refused when a query would overrun it (`__call__`)."""
        if mode not in MODES:
            raise ValueError(f"LLM judge mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode == "score" and not 2 <= top_score <= 9:
            raise ValueError(f"LLM judge top_score must be 2..9 (one digit token each), got {top_score}")
        # Before the weights load: None where the model computes its positions (no hard limit).
        self.positions = position_table(path)
        if max_length is None:
            max_length = min(
                DEFAULT_MAX_LENGTH, self.positions.positions if self.positions else DEFAULT_MAX_LENGTH
            )
        if max_length < 1:
            raise ValueError(f"LLM judge max_length must be at least 1, got {max_length}")
        self.mode, self.top_score, self.max_length, self.device = mode, top_score, max_length, device
        self.name = str(path)  # the judge model, as reports name it
        self.rubric = rubric or (YES_NO_RUBRIC if mode == "yes_no" else SCORE_RUBRIC)
        for field in ("{prompt}", "{response}"):
            if field not in self.rubric:
                raise ValueError(f"LLM judge rubric must contain {field}")
        self.tokenizer = load_tokenizer(path)
        self.model = load_causal_lm(path).to(device).eval().requires_grad_(False)
        words = ["yes", "no"] if mode == "yes_no" else [str(k) for k in range(1, top_score + 1)]
        # One list of token ids per answer; their probabilities add up to the answer's.
        self.answer_ids = [self._first_tokens(w) for w in words]
        seen: dict[int, str] = {}
        for word, ids in zip(words, self.answer_ids, strict=True):
            for i in ids:
                if i in seen:
                    raise ValueError(
                        f"LLM judge: the tokenizer at {path} does not tell {words} apart by first token "
                        f"({seen[i]!r} and {word!r} both start with {self.tokenizer.decode([i])!r})"
                    )
                seen[i] = word

    def _first_tokens(self, word: str) -> list[int]:
        """The distinct first tokens of the common spellings of an answer word: as is, capitalised,
        each with and without a leading space."""
        ids: list[int] = []
        for spelling in dict.fromkeys([word, word.capitalize(), " " + word, " " + word.capitalize()]):
            pieces = self.tokenizer(spelling, add_special_tokens=False)["input_ids"]
            # A bare space piece (" yes" as " " + "yes" in some vocabularies) says nothing about the answer.
            if pieces and self.tokenizer.decode(pieces[:1]).strip() and pieces[0] not in ids:
                ids.append(pieces[0])
        if not ids:
            raise ValueError(f"LLM judge: the tokenizer encodes {word!r} as nothing")
        return ids

    def _render(self, prompt: Any, response: str) -> list[int]:
        text = self.rubric.format(prompt=_text(prompt), response=response, top=self.top_score)
        return prompt_token_ids(self.tokenizer, text)

    def _query_ids(self, prompt: Any, response: str) -> list[int]:
        """The judge's query, at most max_length tokens. A long response is cut in its middle (as
        "head ... tail"), so the query keeps its start (BOS, rubric, request) and its end (the
        question and the assistant turn marker). Where the query without a response is already over
        max_length (a very long request or rubric), it keeps the last max_length tokens, with a warning."""
        full = self._render(prompt, response)
        if len(full) <= self.max_length:
            return full
        pieces = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        # The response's token budget: what the query with only the marker in its place leaves.
        keep = self.max_length - len(self._render(prompt, TRUNCATION_MARKER))
        while keep > 0:
            head, tail = pieces[: keep - keep // 2], pieces[len(pieces) - keep // 2 :]
            cut = self.tokenizer.decode(head) + TRUNCATION_MARKER + self.tokenizer.decode(tail)
            ids = self._render(prompt, cut)
            if len(ids) <= self.max_length:
                return ids
            # Tokens can merge across the cut differently: shrink by the overshoot and try again.
            keep -= len(ids) - self.max_length
        warnings.warn(
            f"LLM judge: the query leaves no room for its response within max_length={self.max_length} "
            "tokens; keeping its last max_length tokens (its start, BOS included, is lost)",
            stacklevel=2,
        )
        return full[-self.max_length :]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """One score per (prompt, response): P(yes) in [0, 1], or the expected score in [1, K].

        A query that, cut to max_length, still overruns the judge's learned position table is an
        error naming max_length and the table, before the judge reads any query."""
        queries = [self._query_ids(p, r) for p, r in zip(prompts, responses, strict=True)]
        check_cut_sequences(
            self.positions, "LLM judge max_length", self.max_length, [len(q) for q in queries], "judge query"
        )
        pad = self.tokenizer.pad_token_id
        out: list[float] = []
        for start in range(0, len(queries), batch_size):
            ids, mask = left_pad(queries[start : start + batch_size], pad)
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = (
                self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    use_cache=False,
                )
                .logits[:, -1]
                .float()
            )
            # log P(answer) up to a shared constant: the sum over its spellings' first tokens.
            answer_logits = torch.stack([logits[:, ids].logsumexp(-1) for ids in self.answer_ids], dim=-1)
            # Renormalised over the answers only: the judge's mass on other words is not a vote.
            probs = torch.softmax(answer_logits, dim=-1)
            if self.mode == "yes_no":
                scores = probs[:, 0]
            else:
                values = torch.arange(1, self.top_score + 1, device=probs.device, dtype=probs.dtype)
                scores = (probs * values).sum(-1)
            out += scores.tolist()
        return out

    def utility(self, prompt: Any, response: str) -> float:
        """The score of one response: the shape of a gold utility, for evaluate_policies."""
        return self([prompt], [response])[0]


@lru_cache(maxsize=4)
def _cached_judge(
    model: str, rubric: str | None, mode: str, top_score: int, max_length: int | None
) -> LLMJudge:
    return LLMJudge(model, rubric=rubric, mode=mode, top_score=top_score, max_length=max_length)


def judge_reward(
    prompts: Sequence[Any],
    responses: Sequence[str],
    model: str,
    rubric: str | None = None,
    mode: str = "yes_no",
    top_score: int = 5,
    max_length: int | None = None,
) -> list[float]:
    """Reward function form of the judge (the model is loaded once per configuration)."""
    return _cached_judge(str(model), rubric, mode, top_score, max_length)(prompts, responses)
