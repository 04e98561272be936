"""Pure parts of the feedback service: answers, golden checks, export rows, passwords, rate limit."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from rlhfkit.data.records import Rating
from rlhfkit.feedback.answers import (
    AnswerError,
    StoredAnswer,
    is_correct,
    nominal_value,
    store_answer,
    validate_golden,
)
from rlhfkit.feedback.auth import (
    SCRYPT_COST_ENV,
    LoginRateLimiter,
    hash_password,
    needs_rehash,
    scrypt_cost,
    token_digest,
    verify_password,
)
from rlhfkit.feedback.exports import preference_rows, raw_rows, sft_rows, unpaired_rows
from rlhfkit.feedback.store import ItemRecord, LabelRecord

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def test_comparison_answer_maps_presented_position_to_original_index():
    assert store_answer("comparison", {"choice": "left", "strength": 3}, [1, 0]) == StoredAnswer(
        1, 0, 3, None
    )
    assert store_answer("comparison", {"choice": "right"}, [1, 0]) == StoredAnswer(0, 1, 1, None)
    assert store_answer("comparison", {"choice": "tie"}, [0, 1]) == StoredAnswer(None, None, 1, None)


def test_ranking_answer_is_kept_in_original_indices():
    # Shown order: original 2, 0, 1. The annotator ranks shown positions 1 > 2 > 0,
    # that is originals 0 > 1 > 2.
    stored = store_answer("ranking", {"ranking": [1, 2, 0]}, [2, 0, 1])
    assert stored == StoredAnswer(0, 1, None, {"ranking": [0, 1, 2]})


@pytest.mark.parametrize(
    ("task_type", "answer", "field"),
    [
        ("comparison", {"choice": "up"}, "choice"),
        ("comparison", {"choice": []}, "choice"),  # unhashable: found by the API fuzzer (was a 500)
        ("comparison", {"choice": {"left": 1}}, "choice"),
        ("comparison", {"choice": "left", "strength": 4}, "strength"),
        ("comparison", {"choice": "left", "strength": True}, "strength"),
        ("ranking", {"ranking": [0, 0, 1]}, "ranking"),
        ("ranking", {"ranking": [0, 1]}, "ranking"),
        ("ranking", {"ranking": "012"}, "ranking"),
        ("likert", {"rating": 8}, "rating"),
        ("likert", {"rating": 0}, "rating"),
        ("likert", {"rating": 3.5}, "rating"),
        ("binary", {"label": 1}, "label"),
        ("edit", {"text": "   "}, "text"),
        ("demonstration", {}, "text"),
        ("edit", {"text": "x", "extra": 1}, "extra"),
    ],
)
def test_bad_answers_name_the_field(task_type, answer, field):
    with pytest.raises(AnswerError) as err:
        store_answer(
            task_type,
            answer,
            [0, 1, 2] if task_type == "ranking" else [0, 1][: 2 if task_type == "comparison" else 1],
        )
    assert err.value.field == field
    assert f"field {field!r}" in str(err.value)


def test_rating_messages_are_the_record_schemas():
    # One rule (rlhfkit.data.records.check_rating) for answers, golden items and rating files.
    with pytest.raises(AnswerError) as err:
        store_answer("likert", {"rating": 8}, [0])
    assert str(err.value) == "field 'rating': must be an integer from 1 to 7, got 8"
    with pytest.raises(ValueError) as golden:
        validate_golden("likert", {"rating": True}, 1)
    assert str(golden.value) == "field 'rating': must be an integer from 1 to 7, got True"
    assert store_answer("likert", {"rating": 7}, [0]) == StoredAnswer(None, None, None, {"rating": 7})
    with pytest.raises(ValidationError) as record:
        Rating.model_validate({"prompt": "q", "completion": "a", "rating": 8})
    assert "must be an integer from 1 to 7, got 8" in str(record.value)


def test_golden_checks():
    assert validate_golden("comparison", {"chosen": None}, 2) == {"chosen": None}
    for task_type, golden in [
        ("comparison", {"chosen": 2}),
        ("comparison", {"chosen": True}),
        ("ranking", {"ranking": [0, 0]}),
        ("likert", {"rating": 9}),
        ("binary", {"label": "yes"}),
        ("edit", {"text": "x"}),
    ]:
        with pytest.raises(ValueError):
            validate_golden(task_type, golden, 2)
    assert is_correct("comparison", {"chosen": 1}, StoredAnswer(1, 0, 1, None))
    assert not is_correct("comparison", {"chosen": None}, StoredAnswer(1, 0, 1, None))
    assert is_correct("ranking", {"ranking": [2, 0, 1]}, StoredAnswer(2, 0, None, {"ranking": [2, 1, 0]}))
    assert not is_correct("ranking", {"ranking": [2, 0, 1]}, StoredAnswer(0, 0, None, {"ranking": [0, 2, 1]}))
    assert is_correct("likert", {"rating": 5}, StoredAnswer(None, None, None, {"rating": 6}))
    assert not is_correct("likert", {"rating": 5}, StoredAnswer(None, None, None, {"rating": 7}))
    assert is_correct("binary", {"label": False}, StoredAnswer(None, None, None, {"label": False}))
    assert nominal_value("comparison", None, None) == "tie"
    assert nominal_value("likert", None, {"rating": 3}) == 3
    assert nominal_value("edit", None, {"text": "x"}) is None


def _label(item_id, annotator, kind, chosen=None, value=None):
    return LabelRecord(1, item_id, annotator, chosen, [0, 1, 2], None, T0, 1.0, kind, value)


def test_ranking_export_counts_votes_per_pair():
    items = {1: ItemRecord(1, "p", ["a", "b", "c"], 3, {})}
    labels = [
        _label(1, "x", "ranking", 0, {"ranking": [0, 1, 2]}),
        _label(1, "y", "ranking", 0, {"ranking": [0, 2, 1]}),
        _label(1, "z", "ranking", 1, {"ranking": [1, 0, 2]}),
    ]
    rows = {
        (r["chosen"], r["rejected"]): (r["n_votes"], r["agreement"])
        for r in preference_rows("ranking", "P", items, labels)
    }
    # a>b: x, y vs z (2 of 3); a>c: all three; b>c: x, z vs y (2 of 3).
    assert rows == {("a", "b"): (3, 2 / 3), ("a", "c"): (3, 1.0), ("b", "c"): (3, 2 / 3)}


def test_edit_thumbs_and_sft_exports():
    chat = [{"role": "user", "content": "hi"}]
    items = {
        1: ItemRecord(1, "user: hi", ["orig"], 1, {}, messages=chat),
        2: ItemRecord(2, "q", ["same"], 1, {}),
    }
    edits = [
        _label(1, "x", "edit", value={"text": "better"}),
        _label(2, "y", "edit", value={"text": "same "}),
    ]
    assert list(preference_rows("edit", "E", items, edits)) == [
        {
            "prompt": chat,
            "chosen": [{"role": "assistant", "content": "better"}],
            "rejected": [{"role": "assistant", "content": "orig"}],
            "annotator": "x",
            "source": "feedback:E",
        }
    ]
    assert [r["completion"] for r in sft_rows("edit", "E", items, edits)] == [
        [{"role": "assistant", "content": "better"}],
        "same ",
    ]
    thumbs = [_label(2, "x", "binary", value={"label": False})]
    assert list(unpaired_rows("binary", "B", items, thumbs)) == [
        {"prompt": "q", "completion": "same", "label": False, "annotator": "x"}
    ]
    with pytest.raises(ValueError, match="trl-unpaired"):
        list(unpaired_rows("likert", "L", items, thumbs))
    with pytest.raises(ValueError, match="no preference pairs"):
        list(preference_rows("likert", "L", items, thumbs))
    (raw,) = raw_rows(items, thumbs)
    assert raw["annotator"] == "x" and raw["value"] == {"label": False} and raw["kind"] == "binary"


def test_password_hash_round_trip():
    encoded = hash_password("correct horse")
    assert encoded.startswith("scrypt$") and "correct horse" not in encoded
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct hors", encoded)
    assert not verify_password("correct horse", None)
    assert not verify_password("x", "md5$abc")
    assert hash_password("correct horse") != encoded  # salted
    with pytest.raises(ValueError, match="at least 8"):
        hash_password("short")
    assert token_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# OWASP Password Storage Cheat Sheet: scrypt with N=2^17, r=8, p=1 at least, or one of these equals.
OWASP_SCRYPT_MINIMUMS = {(2**17, 8, 1), (2**16, 8, 2), (2**15, 8, 3), (2**14, 8, 5), (2**13, 8, 10)}


def test_new_password_hashes_meet_owasps_scrypt_minimum_in_production(monkeypatch):
    monkeypatch.delenv(SCRYPT_COST_ENV, raising=False)  # the test suite's cheap knob, unset
    assert scrypt_cost() == (2**15, 8, 3)
    n, r, p = scrypt_cost()
    assert any(n >= mn and r >= mr and p >= mp for mn, mr, mp in OWASP_SCRYPT_MINIMUMS)
    encoded = hash_password("correct horse")
    assert encoded.split("$")[1:4] == ["32768", "8", "3"]
    assert verify_password("correct horse", encoded) and not needs_rehash(encoded)


def test_scrypt_cost_knob_is_explicit_and_checked(monkeypatch):
    monkeypatch.setenv(SCRYPT_COST_ENV, "1024,8,1")
    assert hash_password("correct horse").split("$")[1:4] == ["1024", "8", "1"]
    for bad in ["", "1024", "1024,8", "1000,8,1", "1024,0,1", "1024,8,0", "fast", "2097152,8,1"]:
        monkeypatch.setenv(SCRYPT_COST_ENV, bad)
        with pytest.raises(ValueError, match=SCRYPT_COST_ENV):
            hash_password("correct horse")  # never a quiet fall-back to some other cost


def test_hashes_with_older_parameters_still_verify_and_ask_for_a_rehash(monkeypatch):
    monkeypatch.delenv(SCRYPT_COST_ENV, raising=False)
    old = hash_password("correct horse", cost=(2**14, 8, 1))  # what rlhfkit stored before
    assert old.split("$")[1:4] == ["16384", "8", "1"]
    assert verify_password("correct horse", old) and not verify_password("correct hors", old)
    assert needs_rehash(old)


def test_login_rate_limiter_window():
    now = [0.0]
    limiter = LoginRateLimiter(attempts=3, window=60, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("name:a") == 0
        limiter.failed("name:a")
    assert limiter.retry_after("name:a", "addr:1") == pytest.approx(60)
    assert limiter.retry_after("name:b") == 0
    now[0] = 30
    assert limiter.retry_after("name:a") == pytest.approx(30)
    now[0] = 60.5
    assert limiter.retry_after("name:a") == 0
    limiter.failed("name:a")
    limiter.succeeded("name:a")
    assert limiter.retry_after("name:a") == 0


def test_login_rate_limiter_memory_holds_only_the_window():
    now = [0.0]
    limiter = LoginRateLimiter(attempts=3, window=60, clock=lambda: now[0])
    limiter.failed("addr:1", "name:a")
    limiter.failed("addr:1", "name:b")
    # Asking about ever new names (refused logins do only that) keeps nothing.
    for i in range(100):
        assert limiter.retry_after(f"name:n{i}", "addr:1") == 0
    assert limiter.n_keys() == 3
    now[0] = 61
    limiter.failed("addr:2", "name:c")  # the old failures left the window: their keys go
    assert limiter.n_keys() == 2
    assert limiter.retry_after("addr:1", "name:a", "name:b") == 0


def test_login_rate_limiter_counts_the_checks_in_flight():
    limiter = LoginRateLimiter(attempts=2, window=60)
    assert limiter.attempt("name:a", "addr:1") == 0
    assert limiter.attempt("name:b", "addr:1") == 0
    # Two checks in flight from one address: a third waits for them, and goes ahead if they were right.
    third = []
    waiting = threading.Thread(target=lambda: third.append(limiter.attempt("name:c", "addr:1")))
    waiting.start()
    time.sleep(0.2)
    assert waiting.is_alive() and not third
    limiter.finished("name:a", "addr:1", failed=False)
    waiting.join(timeout=5)
    assert third == [0]
    # If they were wrong, the next is refused, and a refusal counts nothing.
    limiter.finished("name:b", "addr:1", failed=True)
    limiter.finished("name:c", "addr:1", failed=True)
    assert limiter.attempt("name:d", "addr:1") == pytest.approx(60, abs=1)
    assert limiter.n_keys() == 3  # name:b, name:c and addr:1
    assert limiter.attempt("name:d", "addr:2") == 0
