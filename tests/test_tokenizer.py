"""The tiny model's tokenizer: byte-level BPE, word pieces or superword pieces."""

from __future__ import annotations

import re

import pytest

from rlhfkit.models.tokenizer import train_tokenizer

LISTS = [
    "Top 5 ideas for winter meals:\n1. Roast turkey with stuffing\n2. Pumpkin pie\n3. Green bean casserole",
    "Houseplants for beginners\n- Snake plant\n- Pothos\n- Peace lily\n- Snake plant",
    "Green bean casserole and Pumpkin pie are ideas for winter meals. So is Roast turkey with stuffing.",
] * 30
ODD = "Ünïcødé ✓ 🎉 tabs\tand  two spaces, 42 numbers; <b>&amp;</b>\n\n1) x\r\n"


def _pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("superwords", [False, True])
def test_any_text_round_trips(superwords):
    tokenizer = train_tokenizer(LISTS, vocab_size=400, superwords=superwords)
    for text in [*LISTS[:3], ODD, ""]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_superword_pieces_cross_spaces_but_not_lines_digits_or_punctuation():
    words = train_tokenizer(LISTS, vocab_size=400)
    superwords = train_tokenizer(LISTS, vocab_size=400, superwords=True)
    item = " Roast turkey with stuffing"
    assert len(_pieces(words, item)) == 4  # a word piece never spans a space
    assert _pieces(superwords, item) == [item]
    text = LISTS[0] + "\n" + LISTS[1]
    pieces = _pieces(superwords, text)
    assert "".join(pieces) == text
    for piece in pieces:
        # A newline, a run of digits or a punctuation mark is a piece of its own.
        if re.search(r"[\n0-9]|[^\w\s]", piece):
            assert re.fullmatch(r"\n|[0-9]+|[^\w\s]", piece), piece
    # The list's items are whole pieces, so a repeated item is a repeated token.
    assert pieces.count(" Snake plant") == 2
