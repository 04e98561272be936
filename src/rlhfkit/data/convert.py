"""Pure converters between public feedback formats and rlhfkit records.

- rankings of K responses -> C(K, 2) preference pairs (as in InstructGPT);
- Anthropic HH-RLHF rows (two full transcripts) -> prompt + two final replies, the prompt as
  the transcript's text (`hh`) or as chat messages (`hh-chat`);
- OpenAI summarize-from-feedback comparisons -> TL;DR prompt + two summaries;
- preference pairs -> TRL rows (plain dicts).

Converters raise ValueError with the reason when a row cannot be converted; callers
that read files add the file and line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rlhfkit.data.io import DataError, read_rows
from rlhfkit.data.records import PreferencePair, Ranking, completion_for

__all__ = [
    "CONVERTERS",
    "HH_ASSISTANT",
    "HH_HUMAN",
    "convert_file",
    "hh_to_chat_pair",
    "hh_to_pair",
    "pairs_to_trl_rows",
    "ranking_to_pairs",
    "summarize_comparison_to_pair",
    "summarize_prompt",
]

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
HH_SOURCE = "hh-rlhf"
SUMMARIZE_SOURCE = "summarize_from_feedback"


def ranking_to_pairs(ranking: Ranking) -> list[PreferencePair]:
    """Expand a ranking of K responses into all C(K, 2) pairs, the better one as chosen.

    Pairs come in rank order: (1st, 2nd), (1st, 3rd), ..., (2nd, 3rd), ... A pair of
    identical response texts carries no preference and is skipped. After a chat prompt each
    response is one assistant message (TRL's conversational form, `completion_for`).
    """
    ordered = [ranking.responses[index] for index in ranking.ranking]
    pairs = []
    for i, better in enumerate(ordered):
        for worse in ordered[i + 1 :]:
            if better != worse:
                chosen, rejected = (completion_for(ranking.prompt, text) for text in (better, worse))
                pairs.append(PreferencePair(prompt=ranking.prompt, chosen=chosen, rejected=rejected))
    return pairs


def _required_str(row: Mapping[str, Any], key: str, what: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        if value is None:
            raise ValueError(f"{what}: missing '{key}'")
        raise ValueError(f"{what}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _split_hh(transcript: str, key: str) -> tuple[str, str]:
    """Split an HH transcript into (conversation up to the last assistant marker, reply)."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"HH row: '{key}' has no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    reply = transcript[cut:]
    if HH_HUMAN in reply:
        raise ValueError(f"HH row: '{key}' ends with a human turn, not an assistant reply")
    reply = reply.strip()
    if not reply:
        raise ValueError(f"HH row: the final assistant reply in '{key}' is empty")
    return transcript[:cut], reply


def hh_to_pair(row: Mapping[str, Any]) -> PreferencePair:
    """Convert an Anthropic HH-RLHF row ``{"chosen", "rejected"}`` (transcripts) to a pair.

    The prompt is the shared conversation up to and including the last
    ``"\\n\\nAssistant:"`` marker (kept verbatim); chosen and rejected are the two final
    assistant replies, stripped.
    """
    chosen_prompt, chosen = _split_hh(_required_str(row, "chosen", "HH row"), "chosen")
    rejected_prompt, rejected = _split_hh(_required_str(row, "rejected", "HH row"), "rejected")
    if chosen_prompt != rejected_prompt:
        at = len(os.path.commonprefix([chosen_prompt, rejected_prompt]))
        raise ValueError(
            "HH row: 'chosen' and 'rejected' do not share the conversation before the final "
            f"assistant reply (they differ from character {at})"
        )
    if chosen == rejected:
        raise ValueError("HH row: the chosen and rejected replies are identical")
    return PreferencePair(prompt=chosen_prompt, chosen=chosen, rejected=rejected, source=HH_SOURCE)


def hh_to_chat_pair(row: Mapping[str, Any]) -> PreferencePair:
    """`hh_to_pair` with the prompt as chat messages: each "Human:" turn a user message and each
    earlier "Assistant:" turn an assistant message, so a chat model's template lays the conversation
    out as its own turns instead of one user turn holding the whole transcript."""
    pair = hh_to_pair(row)
    text = pair.prompt
    if not text.startswith(HH_HUMAN) or not text.endswith(HH_ASSISTANT):
        raise ValueError("HH row: the conversation does not start with '\\n\\nHuman:'")
    messages = []
    # Turns alternate between the two markers; whichever comes next ends the current turn.
    rest, role = text[len(HH_HUMAN) : -len(HH_ASSISTANT)], "user"
    while True:
        marker = HH_ASSISTANT if role == "user" else HH_HUMAN
        content, found, rest = rest.partition(marker)
        messages.append({"role": role, "content": content.strip()})
        if not found:
            break
        role = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "user" or any(not m["content"] for m in messages):
        raise ValueError("HH row: a turn of the conversation before the final reply is empty")
    # TRL's conversational form: after a chat prompt, each reply is an assistant message.
    return PreferencePair(
        prompt=messages,
        chosen=completion_for(messages, pair.chosen),
        rejected=completion_for(messages, pair.rejected),
        source=HH_SOURCE,
    )


def summarize_prompt(subreddit: str, title: str, post: str) -> str:
    """Build the TL;DR prompt of summarize-from-feedback posts: the query format of Stiennon et al.
    (2020), which TRL's TL;DR datasets use too, with a blank line between its parts."""
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def summarize_comparison_to_pair(row: Mapping[str, Any]) -> PreferencePair:
    """Convert an OpenAI summarize-from-feedback comparison row to a preference pair.

    Expects ``{"info": {"post", "title", "subreddit", ...}, "summaries": [{"text"}, {"text"}],
    "choice": 0|1, "worker": ...}``; the chosen summary is ``summaries[choice]``.
    Summary texts are stripped (the dataset stores most with a leading space).
    The news-article rows of its validation split (CNN/DM: ``info`` holds ``article``, no post)
    get the paper's article prompt, ``Article:\n{article}\n\nTL;DR:``.
    """
    what = "summarize-from-feedback row"
    info = row.get("info")
    if not isinstance(info, Mapping):
        raise ValueError(f"{what}: 'info' must be an object with post, title and subreddit")
    if info.get("post") is None and info.get("article") is not None:
        prompt = f"Article:\n{_required_str(info, 'article', f'{what} info')}\n\nTL;DR:"
    else:
        post = _required_str(info, "post", f"{what} info")
        title = _required_str(info, "title", f"{what} info")
        subreddit = _required_str(info, "subreddit", f"{what} info")
        prompt = summarize_prompt(subreddit, title, post)

    summaries = row.get("summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise ValueError(f"{what}: 'summaries' must be a list of two summaries")
    texts = []
    for index, summary in enumerate(summaries):
        if not isinstance(summary, Mapping):
            raise ValueError(f"{what}: summaries[{index}] must be an object with 'text'")
        text = _required_str(summary, "text", f"{what} summaries[{index}]").strip()
        if not text:
            raise ValueError(f"{what}: summaries[{index}] has empty text")
        texts.append(text)

    choice = row.get("choice")
    # bool is an int subclass; True/False are not valid choices in this dataset.
    if not isinstance(choice, int) or isinstance(choice, bool) or choice not in (0, 1):
        raise ValueError(f"{what}: 'choice' must be 0 or 1, got {choice!r}")
    if texts[0] == texts[1]:
        raise ValueError(f"{what}: the two summaries are identical")

    worker = row.get("worker")
    return PreferencePair(
        prompt=prompt,
        chosen=texts[choice],
        rejected=texts[1 - choice],
        annotator=worker if isinstance(worker, str) and worker else None,
        source=SUMMARIZE_SOURCE,
    )


def pairs_to_trl_rows(pairs: Iterable[PreferencePair]) -> list[dict[str, Any]]:
    """Dump pairs as TRL preference rows (plain JSON-able dicts, None fields dropped)."""
    return [pair.model_dump(mode="json", exclude_none=True) for pair in pairs]


# `rlhfkit convert --from NAME`: the public formats a data file can be converted from.
CONVERTERS: dict[str, Callable[[Mapping[str, Any]], PreferencePair]] = {
    "hh": hh_to_pair,
    "hh-chat": hh_to_chat_pair,
    "summarize": summarize_comparison_to_pair,
}


def convert_file(
    path: str | os.PathLike[str], source: str, skipped: dict[str, list[int]] | None = None
) -> list[PreferencePair]:
    """Every row of a .jsonl, .json or .parquet file (or a Hugging Face dataset source, see
    rlhfkit.data.io) in the `source` format (a key of CONVERTERS) as a preference pair.

    The first row that cannot be converted is a DataError naming the file, the row and the reason;
    nothing is returned from a file with a bad row. With `skipped` (a dict, filled here), such rows
    are left out instead and listed by reason (`reason -> row numbers`): public sets hold a few
    (HH has replies that are empty or the same in chosen and rejected). A file none of whose rows
    converts is still an error: it is in another format."""
    if source not in CONVERTERS:
        raise ValueError(f"unknown source format {source!r}; expected one of: {', '.join(CONVERTERS)}")
    rows, unit = read_rows(path)
    pairs = []
    first: str | None = None
    for number, row in rows:
        try:
            pairs.append(CONVERTERS[source](row))
        except ValueError as exc:
            if skipped is None:
                raise DataError(path, str(exc), number, unit=unit) from None
            first = first or f"{unit} {number}: {exc}"
            # The reason without its row-specific detail ("... (they differ from character 812)").
            skipped.setdefault(str(exc).split(" (", 1)[0], []).append(number)
    if not pairs and first is not None:
        raise DataError(path, f"no row converts as '{source}' (the first, {first})")
    return pairs
