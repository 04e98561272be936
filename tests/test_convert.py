"""Tests for rlhfkit.data.convert."""

from __future__ import annotations

from itertools import combinations

import pytest

from rlhfkit.data.convert import (
    hh_to_chat_pair,
    hh_to_pair,
    pairs_to_trl_rows,
    ranking_to_pairs,
    summarize_comparison_to_pair,
    summarize_prompt,
)
from rlhfkit.data.records import PreferencePair, Ranking


def test_ranking_of_four_gives_six_ordered_pairs() -> None:
    # Best first: "c" > "a" > "d" > "b".
    ranking = Ranking(prompt="Q", responses=["a", "b", "c", "d"], ranking=[2, 0, 3, 1])
    pairs = ranking_to_pairs(ranking)
    order = ["c", "a", "d", "b"]
    assert [(p.chosen, p.rejected) for p in pairs] == list(combinations(order, 2))
    assert len(pairs) == 6
    assert all(p.prompt == "Q" for p in pairs)


def test_ranking_after_a_chat_prompt_gives_assistant_messages() -> None:
    messages = [{"role": "user", "content": "Q"}]
    pairs = ranking_to_pairs(Ranking(prompt=messages, responses=["a", "b"], ranking=[1, 0]))
    (pair,) = pairs
    assert [m.model_dump() for m in pair.chosen] == [{"role": "assistant", "content": "b"}]
    assert [m.model_dump() for m in pair.rejected] == [{"role": "assistant", "content": "a"}]


def test_ranking_skips_identical_responses() -> None:
    ranking = Ranking(prompt="Q", responses=["a", "a", "b"], ranking=[0, 1, 2])
    assert [(p.chosen, p.rejected) for p in ranking_to_pairs(ranking)] == [("a", "b"), ("a", "b")]


HH_PREFIX = (
    "\n\nHuman: What is a good houseplant?"
    "\n\nAssistant: A pothos is hard to kill."
    "\n\nHuman: And one that flowers?"
    "\n\nAssistant:"
)


def test_hh_two_turn_conversion() -> None:
    row = {
        "chosen": HH_PREFIX + " An African violet flowers most of the year. ",
        "rejected": HH_PREFIX + " Plants are boring.",
    }
    pair = hh_to_pair(row)
    assert pair.prompt == HH_PREFIX
    assert pair.chosen == "An African violet flowers most of the year."
    assert pair.rejected == "Plants are boring."
    assert pair.source == "hh-rlhf"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            {"chosen": HH_PREFIX + " a", "rejected": "\n\nHuman: Other?\n\nAssistant: b"},
            "do not share the conversation",
        ),
        ({"chosen": HH_PREFIX + " a", "rejected": HH_PREFIX + " a"}, "identical"),
        (
            {"chosen": HH_PREFIX + " a", "rejected": HH_PREFIX + "  "},
            "reply in 'rejected' is empty",
        ),
        ({"chosen": "no markers", "rejected": HH_PREFIX + " b"}, "'chosen' has no"),
        ({"chosen": HH_PREFIX + " a"}, "missing 'rejected'"),
        (
            {"chosen": HH_PREFIX + " a\n\nHuman: more?", "rejected": HH_PREFIX + " b"},
            "ends with a human turn",
        ),
    ],
)
def test_hh_bad_rows(row: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        hh_to_pair(row)


SUMMARIZE_ROW = {
    "info": {
        "id": "t3_abc",
        "post": "My cat knocks everything off the table.",
        "title": "Cat problem",
        "subreddit": "cats",
    },
    "summaries": [
        {"text": " cat pushes things off tables", "policy": "sup1", "note": None},
        {"text": " I have a cat", "policy": "ref", "note": None},
    ],
    "choice": 0,
    "worker": "w42",
    "batch": "batch3",
    "split": "train",
}


def test_summarize_conversion() -> None:
    pair = summarize_comparison_to_pair(SUMMARIZE_ROW)
    assert pair.prompt == (
        "SUBREDDIT: r/cats\n\nTITLE: Cat problem\n\nPOST: My cat knocks everything off the table.\n\nTL;DR:"
    )
    assert pair.chosen == "cat pushes things off tables"
    assert pair.rejected == "I have a cat"
    assert pair.annotator == "w42"
    assert pair.source == "summarize_from_feedback"
    flipped = summarize_comparison_to_pair({**SUMMARIZE_ROW, "choice": 1})
    assert (flipped.chosen, flipped.rejected) == (pair.rejected, pair.chosen)


def test_summarize_prompt_is_the_papers_tldr_format() -> None:
    # The query format of the paper and of TRL's TL;DR datasets: parts separated by a blank line,
    # so a model trained on converted pairs sees the prompts those datasets and checkpoints use.
    assert summarize_prompt("relationships", "T", "P") == (
        "SUBREDDIT: r/relationships\n\nTITLE: T\n\nPOST: P\n\nTL;DR:"
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"choice": 2}, "'choice' must be 0 or 1"),
        ({"choice": True}, "'choice' must be 0 or 1"),
        ({"summaries": [{"text": "x"}]}, "list of two summaries"),
        ({"info": {"post": "p", "subreddit": "s"}}, "missing 'title'"),
        ({"info": {"article": 7, "site": "cnn"}}, "'article' must be a string"),
    ],
)
def test_summarize_bad_rows(change: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        summarize_comparison_to_pair({**SUMMARIZE_ROW, **change})


def test_summarize_news_article_rows_get_the_papers_article_prompt() -> None:
    # The CNN/DM rows of the validation split: no Reddit post, an article instead.
    row = {**SUMMARIZE_ROW, "info": {"id": "cnn-1", "article": "Rain fell.", "site": "cnn"}, "choice": 1}
    pair = summarize_comparison_to_pair(row)
    assert pair.prompt == "Article:\nRain fell.\n\nTL;DR:"
    assert (pair.chosen, pair.rejected) == ("I have a cat", "cat pushes things off tables")


def test_pairs_to_trl_rows_drops_none() -> None:
    pairs = [
        PreferencePair(prompt="Q", chosen="a", rejected="b"),
        PreferencePair.model_validate(
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "chosen": "a",
                "rejected": "b",
                "margin": 2.0,
            }
        ),
    ]
    assert pairs_to_trl_rows(pairs) == [
        {"prompt": "Q", "chosen": "a", "rejected": "b"},
        {
            "prompt": [{"role": "user", "content": "Q"}],
            "chosen": "a",
            "rejected": "b",
            "margin": 2.0,
        },
    ]


def test_convert_command_writes_trl_pairs_that_train_data_reads(tmp_path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.data.io import read_records

    runner = CliRunner()
    good = {"chosen": HH_PREFIX + " An African violet.", "rejected": HH_PREFIX + " Plants are boring."}
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    out = tmp_path / "pairs.jsonl"
    result = runner.invoke(app, ["convert", "--from", "hh", "--in", str(hh), "--out", str(out)])
    assert result.exit_code == 0 and "wrote 2 pairs" in result.output
    (first, _) = read_records(out, "preference")  # what data.preferences reads
    assert first.prompt == HH_PREFIX and first.chosen == "An African violet." and first.source == "hh-rlhf"
    summarize = tmp_path / "comparisons.parquet"
    pq.write_table(pa.Table.from_pylist([SUMMARIZE_ROW]), summarize)
    result = runner.invoke(app, ["convert", "--from", "summarize", "--in", str(summarize), "--out", str(out)])
    assert result.exit_code == 0 and "wrote 1 pairs" in result.output
    # A row that cannot be converted is named, by file and line, and nothing is written.
    hh.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": good["chosen"]}) + "\n")
    result = runner.invoke(
        app, ["convert", "--from", "hh", "--in", str(hh), "--out", str(tmp_path / "x.jsonl")]
    )
    assert (
        result.exit_code == 2
        and f"{hh}:2: HH row: the chosen and rejected replies are identical"
        in " ".join(result.output.split())
    )
    assert not (tmp_path / "x.jsonl").exists()
    bad = runner.invoke(app, ["convert", "--from", "anthropic", "--in", str(hh), "--out", str(out)])
    assert bad.exit_code == 2 and "--from 'anthropic': choose one of hh, hh-chat, summarize" in bad.output


def test_convert_can_skip_the_bad_rows_of_a_public_set_and_count_them(tmp_path) -> None:
    """HH holds a few rows whose replies are empty or the same in chosen and rejected: with
    --skip-bad-rows they are left out and counted by reason; a file of another format still fails."""
    import json

    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.data.io import read_records

    good = {"chosen": HH_PREFIX + " An African violet.", "rejected": HH_PREFIX + " Plants are boring."}
    same = {**good, "rejected": good["chosen"]}
    empty = {**good, "chosen": HH_PREFIX + " "}
    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps(r) + "\n" for r in [same, good, empty, same, good]))
    out = tmp_path / "pairs.jsonl"
    runner = CliRunner()
    result = runner.invoke(
        app, ["convert", "--from", "hh", "--in", str(hh), "--out", str(out), "--skip-bad-rows"]
    )
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    assert "wrote 2 pairs" in text
    assert "skipped 2 rows: HH row: the chosen and rejected replies are identical (rows 1, 4)" in text
    assert "skipped 1 rows: HH row: the final assistant reply in 'chosen' is empty (rows 3)" in text
    assert [p.chosen for p in read_records(out, "preference")] == ["An African violet."] * 2
    # Rows of another format are not "a few bad rows": nothing converts, so it is an error.
    summarize = tmp_path / "summarize.jsonl"
    summarize.write_text(json.dumps({"info": {}, "summaries": [], "choice": 0}) + "\n")
    result = runner.invoke(
        app,
        [
            "convert",
            "--from",
            "hh",
            "--in",
            str(summarize),
            "--out",
            str(tmp_path / "x.jsonl"),
            "--skip-bad-rows",
        ],
    )
    assert result.exit_code == 2 and "no row converts as 'hh' (the first, line 1:" in " ".join(
        result.output.split()
    )
    assert not (tmp_path / "x.jsonl").exists()


def test_hh_chat_conversion_gives_the_conversation_as_messages(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.data.io import read_records

    row = {"chosen": HH_PREFIX + " An African violet. ", "rejected": HH_PREFIX + " Plants are boring."}
    pair = hh_to_chat_pair(row)
    assert [m.model_dump() for m in pair.prompt] == [
        {"role": "user", "content": "What is a good houseplant?"},
        {"role": "assistant", "content": "A pothos is hard to kill."},
        {"role": "user", "content": "And one that flowers?"},
    ]
    # TRL's conversational form: after a chat prompt, each reply is one assistant message.
    assert [m.model_dump() for m in pair.chosen] == [{"role": "assistant", "content": "An African violet."}]
    assert [m.model_dump() for m in pair.rejected] == [{"role": "assistant", "content": "Plants are boring."}]
    assert pair.source == "hh-rlhf"
    # A turn without text is refused rather than silently merged.
    empty_turn = HH_PREFIX.replace("A pothos is hard to kill.", "")
    with pytest.raises(ValueError, match="a turn of the conversation before the final reply is empty"):
        hh_to_chat_pair({"chosen": empty_turn + " a", "rejected": empty_turn + " b"})
    with pytest.raises(ValueError, match="does not start with"):
        hh_to_chat_pair({"chosen": "Hi\n\nAssistant: a", "rejected": "Hi\n\nAssistant: b"})
    # Through the command, into what data.preferences reads.
    hh, out = tmp_path / "hh.jsonl", tmp_path / "pairs.jsonl"
    hh.write_text(json.dumps(row) + "\n")
    result = CliRunner().invoke(app, ["convert", "--from", "hh-chat", "--in", str(hh), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (read,) = read_records(out, "preference")
    assert read.prompt == pair.prompt and read.chosen == pair.chosen
