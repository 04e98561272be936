"""The DPO/KTO/GRPO/RLOO/best-of-n/expert-iteration loops, programmable rewards, the LLM judge,
and a feedback-store export that trains DPO here and loads in TRL's DPOTrainer, on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhfkit.config import RewardSpec, load_config
from rlhfkit.models.loading import load_causal_lm, load_reward_model, save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.train.rewards import (
    build_reward_functions,
    combined_rewards,
    length_penalty,
    repetition_penalty,
    top5_format,
)

GOOD = "1. Paris\n2. Rome\n3. Lisbon\n4. Vienna\n5. Prague"
ITEMS = ["Paris", "Rome", "Lisbon", "Vienna", "Prague", "Oslo", "Berlin", "Madrid", "Athens", "Dublin"]
PROMPTS = [f"Give me the top 5 cities to visit number {i}." for i in range(12)]

# Small enough that every loop here runs in a second or two on one CPU thread.
TINY = [
    "model.vocab_size=300",
    "sft.max_length=48",
    "dpo.batch_size=4",
    "dpo.max_length=48",
    "kto.batch_size=4",
    "kto.max_length=48",
    "grpo.steps=2",
    "grpo.prompts_per_step=2",
    "grpo.group_size=3",
    "grpo.minibatch=6",
    "grpo.max_new_tokens=8",
    "rloo.steps=2",
    "rloo.prompts_per_step=2",
    "rloo.group_size=3",
    "rloo.minibatch=3",
    "rloo.max_new_tokens=8",
    "expert_iter.rounds=1",
    "expert_iter.n=2",
    "expert_iter.n_prompts=4",
    "expert_iter.max_new_tokens=8",
    "expert_iter.batch_size=4",
]


def _lists(i: int) -> tuple[str, str]:
    a = "\n".join(f"{k + 1}. {ITEMS[(i + k) % 10]}" for k in range(5))
    b = "\n".join(f"{k + 1}. {ITEMS[(i + 2 * k) % 10]}" for k in range(3)) + "\nHope this helps."
    return a, b


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    """A tiny random causal LM with the project's chat tokenizer, saved like RUN/sft/model."""
    texts = [p + "\n" + _lists(i)[0] + "\n" + _lists(i)[1] for i, p in enumerate(PROMPTS * 10)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    out = tmp_path_factory.mktemp("sft") / "model"
    save_model(model, tokenizer, out)
    return out


@pytest.fixture(scope="module")
def rm_dir(sft_dir, tmp_path_factory) -> Path:
    """A reward model started from the SFT model (random head): enough to drive the loops."""
    from rlhfkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(sft_dir)
    out = tmp_path_factory.mktemp("rm") / "model"
    torch.manual_seed(0)
    save_model(load_reward_model(sft_dir, tokenizer.pad_token_id), tokenizer, out)
    return out


@pytest.fixture
def pairs() -> list[dict]:
    return [
        {"prompt": p, "chosen": _lists(i)[0], "rejected": _lists(i)[1]} for i, p in enumerate(PROMPTS[:8])
    ]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- programmable rewards --------------------------------------------------------------------


def test_top5_format_verifiable_reward():
    bad = [
        GOOD + "\n6. Oslo",  # six items
        GOOD.replace("3. Lisbon", "3. Paris"),  # duplicate
        GOOD.replace("4.", "5."),  # numbering
        "Here you go:\n" + GOOD,  # rambling line
        "",
    ]
    assert top5_format([""] * 6, [GOOD, *bad]) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert top5_format(["x"], ["  1. a\n2. b\n\n3. c\n4. d\n5. e  "]) == [1.0]  # blank lines ignored


def test_penalties_hand_computed():
    assert length_penalty(["x", "x"], ["a " * 10, "a " * 60], max_words=40) == [0.0, -0.5]
    # Lines 2 and 4 repeat line 1 (numbering and case ignored): 2 of 4 lines.
    assert repetition_penalty(["x"], ["1. Paris\n2. paris\n3. Rome\n4. Paris"]) == [-0.5]
    assert repetition_penalty(["x"], [""]) == [0.0]


@pytest.fixture
def user_rewards(tmp_path, monkeypatch) -> str:
    """A user's own module of reward functions, importable by path like any package."""
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, responses, bonus=1.0):\n    return [bonus * r.count('!') for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards:shout"


def test_build_reward_functions_by_name_and_import_path(rm_dir, user_rewards):
    specs = [
        RewardSpec(fn="top5_format", weight=2.0),
        RewardSpec(fn=user_rewards, weight=0.5, kwargs={"bonus": 3.0}),
        RewardSpec(fn="reward_model", weight=0.0),
    ]
    terms = build_reward_functions(specs, rm_dir)
    total, means = combined_rewards(terms, ["p", "p"], [GOOD, "wow!!"])
    # GOOD: 2 * 1 + 0.5 * 0 ; "wow!!": 2 * 0 + 0.5 * 3 * 2; the RM term has weight 0.
    assert total == pytest.approx([2.0, 3.0])
    assert set(means) == {
        "reward/top5_format",
        "reward/my_rewards:shout",
        "reward/reward_model",
    }
    assert all(math.isfinite(v) for v in means.values())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_builtin", "import path 'module:function'"),
        ("no.such.module:fn", "cannot import 'no.such.module'"),
        ("math:no_such_fn", "no callable 'no_such_fn'"),
    ],
)
def test_bad_reward_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        build_reward_functions([RewardSpec(fn=spec)])


def test_reward_kwargs_the_function_does_not_take_are_refused_when_built(rm_dir):
    with pytest.raises(
        ValueError, match=r"'length_penalty': kwargs \{'bogus': 1\}: .*unexpected keyword .*max_words"
    ):
        build_reward_functions([RewardSpec(fn="length_penalty", kwargs={"bogus": 1})])
    with pytest.raises(ValueError, match=r"'reward_model': kwargs \{'bogus': 1\}: .*max_length"):
        build_reward_functions([RewardSpec(fn="reward_model", kwargs={"bogus": 1})], rm_dir)
    (term,) = build_reward_functions([RewardSpec(fn="length_penalty", kwargs={"max_words": 3})])
    assert term.fn(["p"], ["one two three four five"]) != term.fn(["p"], ["one"])


def test_reward_model_term_needs_a_reward_model():
    with pytest.raises(ValueError, match="rlhfkit rm"):
        build_reward_functions([RewardSpec(fn="reward_model")], None)


def test_reward_function_returning_garbage_is_an_error(user_rewards):
    terms = build_reward_functions([RewardSpec(fn=user_rewards)])
    terms[0].fn = lambda p, r: [float("nan")] * len(r)
    with pytest.raises(ValueError, match="non-finite"):
        combined_rewards(terms, ["p"], ["x"])
    terms[0].fn = lambda p, r: []
    with pytest.raises(ValueError, match="returned 0 values for 1"):
        combined_rewards(terms, ["p"], ["x"])


def test_rewards_config_is_typed():
    cfg = load_config(overrides=["grpo.rewards=[{fn: top5_format, weight: 0.5}, {fn: reward_model}]"])
    assert [r.fn for r in cfg.grpo.rewards] == ["top5_format", "reward_model"]
    from rlhfkit.config import ConfigError

    with pytest.raises(ConfigError, match="grpo.rewards.0.wieght: unknown key"):
        load_config(overrides=["grpo.rewards=[{fn: top5_format, wieght: 0.5}]"])


# ---- DPO / KTO -------------------------------------------------------------------------------


@pytest.mark.parametrize("precompute", [True, False])
def test_dpo_starts_at_ln2_and_learns_the_pairs(sft_dir, pairs, tmp_path, precompute):
    from rlhfkit.train.dpo import run_dpo

    cfg = load_config(
        overrides=[
            *TINY,
            # Plain DPO (the task default is conservative DPO, whose loss cannot go below the
            # entropy of its label smoothing: 0.50 at 0.2).
            "dpo.label_smoothing=0",
            "dpo.beta=0.1",
            "dpo.epochs=6",
            "dpo.lr=3e-3",
            f"dpo.precompute_reference={precompute}",
        ]
    )
    summary = run_dpo(cfg, sft_dir, pairs, tmp_path, show_progress=False)
    rows = _metrics(tmp_path / "metrics.jsonl")
    # Step 1: the policy is the reference, so the loss is exactly ln 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[-1]["loss"] < 0.5 and summary["final_reward_accuracy"] == 1.0
    assert summary["steps"] == 12 and (tmp_path / "model" / "config.json").is_file()
    assert load_causal_lm(tmp_path / "model") is not None


def test_dpo_precomputed_and_live_reference_agree(sft_dir, pairs, tmp_path):
    from rlhfkit.train.dpo import run_dpo

    losses = []
    for precompute in (True, False):
        cfg = load_config(overrides=[*TINY, "dpo.epochs=1", f"dpo.precompute_reference={precompute}"])
        run_dpo(cfg, sft_dir, pairs, tmp_path / str(precompute), show_progress=False)
        losses.append([r["loss"] for r in _metrics(tmp_path / str(precompute) / "metrics.jsonl")])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.parametrize("precompute", [True, False])
def test_bf16_reference_runs_in_the_policys_precision(sft_dir, pairs, tmp_path, precompute):
    """Under mixed precision the policy's prepared forward autocasts; the reference (precomputed or
    live) must too, or the implicit rewards start off zero (a float32 reference gave 3.5e-4)."""
    from rlhfkit.train.dpo import run_dpo
    from rlhfkit.train.kto import run_kto, unpaired_from_pairs

    bf16 = ["model.dtype=bfloat16", "dpo.epochs=1", "kto.epochs=1"]
    switch = [f"dpo.precompute_reference={precompute}", f"kto.precompute_reference={precompute}"]
    cfg = load_config(overrides=[*TINY, *bf16, *switch])
    run_dpo(cfg, sft_dir, pairs, tmp_path / "dpo", show_progress=False)
    first = _metrics(tmp_path / "dpo" / "metrics.jsonl")[0]
    assert (first["reward/chosen"], first["reward/rejected"]) == (0.0, 0.0)
    run_kto(cfg, sft_dir, unpaired_from_pairs(pairs), tmp_path / "kto", show_progress=False)
    first = _metrics(tmp_path / "kto" / "metrics.jsonl")[0]
    assert first["loss"] == 0.5  # r = 0 and z0 = 0 exactly: lambda - lambda / 2


def test_ipo_and_conservative_dpo_run(sft_dir, pairs, tmp_path):
    from rlhfkit.train.dpo import run_dpo

    cfg = load_config(overrides=[*TINY, "dpo.loss_type=ipo", "dpo.beta=0.5"])
    run_dpo(cfg, sft_dir, pairs, tmp_path / "ipo", show_progress=False)
    # IPO at policy == reference: (0 - 1 / (2 beta))^2 = 1.
    assert _metrics(tmp_path / "ipo" / "metrics.jsonl")[0]["loss"] == pytest.approx(1.0, abs=1e-4)
    cfg = load_config(overrides=[*TINY, "dpo.label_smoothing=0.2"])
    run_dpo(cfg, sft_dir, pairs, tmp_path / "cdpo", show_progress=False)
    assert _metrics(tmp_path / "cdpo" / "metrics.jsonl")[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_kto_on_pairs_derived_as_thumbs(sft_dir, pairs, tmp_path):
    from rlhfkit.train.kto import run_kto, unpaired_from_pairs

    examples = unpaired_from_pairs(pairs)
    assert [e["label"] for e in examples[:2]] == [True, False] and len(examples) == 2 * len(pairs)
    cfg = load_config(overrides=[*TINY, "kto.epochs=3", "kto.lr=3e-3"])
    summary = run_kto(cfg, sft_dir, examples, tmp_path, show_progress=False)
    rows = _metrics(tmp_path / "metrics.jsonl")
    # Step 1: r = 0 and z0 = 0, so each example's loss is lambda - lambda / 2 = 0.5.
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-4)
    assert rows[-1]["loss"] < rows[0]["loss"]
    # The trained policy raised its log-ratio to the reference on thumbs-up over thumbs-down.
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.train.dpo import precompute_logprobs, tokenize_example

    tokenizer = load_tokenizer(sft_dir)
    rows_ids = [tokenize_example(tokenizer, e["prompt"], e["completion"], 48) for e in examples]
    pad = tokenizer.pad_token_id
    ratio = precompute_logprobs(
        load_causal_lm(tmp_path / "model"), rows_ids, pad, "cpu"
    ) - precompute_logprobs(load_causal_lm(sft_dir), rows_ids, pad, "cpu")
    labels = torch.tensor([e["label"] for e in examples])
    assert ratio[labels].mean() > ratio[~labels].mean()
    assert summary["n_desirable"] == summary["n_undesirable"] == len(pairs)


# ---- critic-free online methods --------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "extra"),
    [
        ("grpo", []),
        ("grpo", ["grpo.scale_rewards=false", "grpo.loss_normalisation=constant"]),
        ("rloo", []),
        ("rloo", ["rloo.advantage=reinforce_pp"]),
    ],
)
def test_critic_free_loops_run_with_programmable_rewards(sft_dir, rm_dir, tmp_path, section, extra):
    from rlhfkit.train.grpo import run_critic_free

    rewards = "[{fn: reward_model}, {fn: top5_format, weight: 0.5}, {fn: repetition_penalty}]"
    cfg = load_config(overrides=[*TINY, *extra, f"{section}.rewards={rewards}"])
    terms = build_reward_functions(getattr(cfg, section).rewards, rm_dir)
    summary = run_critic_free(cfg, section, sft_dir, terms, PROMPTS, tmp_path, show_progress=False)
    rows = _metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 and all(v is not None for row in rows for v in row.values())
    assert {"reward/reward_model", "reward/top5_format", "reward/repetition_penalty", "kl"} <= set(rows[0])
    assert summary["samples"] == 2 * 2 * 3
    assert (tmp_path / "model" / "config.json").is_file()
    # The update moved the policy away from the SFT start.
    before = load_causal_lm(sft_dir).state_dict()
    after = load_causal_lm(tmp_path / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ---- best-of-n and expert iteration ----------------------------------------------------------


def test_best_of_n_keeps_the_highest_reward_and_draw0_is_the_plain_sample(sft_dir):
    from rlhfkit.train.bon import best_of_n_summary, sample_best_of_n
    from rlhfkit.train.rewards import RewardTerm

    length = RewardTerm("length", 1.0, lambda p, r: [float(len(x)) for x in r])
    result = sample_best_of_n(sft_dir, PROMPTS[:4], [length], 3, seed=5, temperature=1.0, max_new_tokens=8)
    for i in range(4):
        lengths = [len(draw[i]) for draw in result["candidates"]]
        assert result["best"][i] == result["candidates"][result["best_index"][i]][i]
        assert len(result["best"][i]) == max(lengths)
    again = sample_best_of_n(sft_dir, PROMPTS[:4], [length], 1, seed=5, temperature=1.0, max_new_tokens=8)
    assert again["best"] == result["candidates"][0]  # same seed, same first draw
    summary = best_of_n_summary(result, 3)
    assert summary["kl_analytic"] == pytest.approx(math.log(3) - 2 / 3, abs=1e-4)
    assert summary["reward_best"] >= summary["reward_single"]


def test_best_of_n_selects_by_the_exact_reward_and_ties_go_to_the_earliest_draw(sft_dir):
    from rlhfkit.train.bon import sample_best_of_n
    from rlhfkit.train.rewards import RewardTerm

    # Rewards 1 + k * 1e-9 (k: the response's place in the call, draw after draw): later draws are
    # better by less than float32 can tell apart at 1.0, but by more than a double can.
    rising = RewardTerm("rising", 1.0, lambda p, r: [1.0 + k * 1e-9 for k in range(len(r))])
    result = sample_best_of_n(sft_dir, PROMPTS[:3], [rising], 4, seed=3, temperature=1.0, max_new_tokens=6)
    assert result["best_index"] == [3, 3, 3]
    assert [row[3] for row in result["scores"]] == [1.0 + (9 + i) * 1e-9 for i in range(3)]
    # The n draws of a prompt are separate samples, not one sample repeated.
    assert all(len({draw[i] for draw in result["candidates"]}) > 1 for i in range(3))
    # Equal rewards: the earliest draw (draw 0, the plain policy's sample) is kept.
    flat = RewardTerm("flat", 1.0, lambda p, r: [0.5] * len(r))
    tied = sample_best_of_n(sft_dir, PROMPTS[:3], [flat], 4, seed=3, temperature=1.0, max_new_tokens=6)
    assert tied["best_index"] == [0, 0, 0] and tied["best"] == tied["candidates"][0]


def test_expert_iteration_fine_tunes_on_best_samples(sft_dir, rm_dir, tmp_path):
    from rlhfkit.train.bon import run_expert_iteration

    cfg = load_config(overrides=TINY)
    terms = build_reward_functions(cfg.expert_iter.rewards, rm_dir)
    summary = run_expert_iteration(cfg, sft_dir, terms, PROMPTS, tmp_path, show_progress=False)
    assert summary["rounds"] == 1 and summary["n_demonstrations"] > 0
    assert (tmp_path / "model" / "config.json").is_file()
    samples = [json.loads(line) for line in (tmp_path / "round1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["best"] == s["candidates"][s["best_index"]] for s in samples)
    assert all(s["scores"][s["best_index"]] == max(s["scores"]) for s in samples)


# ---- LLM judge -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["yes_no", "score"])
def test_llm_judge_scores_are_finite_in_range_and_deterministic(sft_dir, mode):
    from rlhfkit.eval.llm_judge import LLMJudge, judge_reward

    judge = LLMJudge(sft_dir, mode=mode)
    responses = [GOOD, "1. Paris", "nothing useful here", ""]
    prompts = PROMPTS[: len(responses)]
    scores = judge(prompts, responses)
    lo, hi = (0.0, 1.0) if mode == "yes_no" else (1.0, 5.0)
    assert len(scores) == 4 and all(math.isfinite(s) and lo <= s <= hi for s in scores)
    assert judge(prompts, responses) == scores
    # Padding in a batch changes nothing; one at a time gives the same scores.
    alone = [judge.utility(p, r) for p, r in zip(prompts, responses, strict=True)]
    assert alone == pytest.approx(scores, abs=1e-5)
    assert judge_reward(prompts, responses, model=str(sft_dir), mode=mode) == pytest.approx(scores, abs=1e-6)


def test_llm_judge_rejects_a_rubric_without_fields(sft_dir):
    from rlhfkit.eval.llm_judge import LLMJudge

    with pytest.raises(ValueError, match="{response}"):
        LLMJudge(sft_dir, rubric="Is {prompt} good?")


def test_llm_judge_cuts_a_long_response_in_its_middle(sft_dir):
    from rlhfkit.eval.llm_judge import LLMJudge

    judge = LLMJudge(sft_dir)
    short_a, short_b = judge._query_ids(PROMPTS[0], "one"), judge._query_ids(PROMPTS[0], "two")
    # The rubric's head (BOS, instructions, request) and tail (question, assistant turn marker).
    head = next(i for i, (a, b) in enumerate(zip(short_a, short_b, strict=True)) if a != b)
    tail = next(i for i, (a, b) in enumerate(zip(short_a[::-1], short_b[::-1], strict=True)) if a != b)
    assert short_a[0] == judge.tokenizer.bos_token_id and PROMPTS[0] in judge.tokenizer.decode(short_a[:head])
    assert "Answer yes or no." in judge.tokenizer.decode(short_a[-tail:])

    judge.max_length = len(short_a) + 30
    long = judge._query_ids(PROMPTS[0], "\n".join([GOOD] * 40))
    assert len(long) <= judge.max_length
    assert long[:head] == short_a[:head] and long[-tail:] == short_a[-tail:]
    assert " ... " in judge.tokenizer.decode(long[head:-tail])
    assert judge.tokenizer.decode(long[head:-tail]).startswith(GOOD[:6])
    assert len(judge([PROMPTS[0]], ["\n".join([GOOD] * 40)])) == 1
    # No room for any response: the query's end, as documented, with a warning.
    judge.max_length = tail
    with pytest.warns(UserWarning, match="no room for its response"):
        assert judge._query_ids(PROMPTS[0], "\n".join([GOOD] * 40)) == short_a[-tail:]


@pytest.fixture(scope="module")
def variants_dir(tmp_path_factory) -> Path:
    """A tiny judge whose vocabulary has "yes", "Yes", " yes", " Yes" (and no, and " 1".." 5")
    each as its own token, as chat models' vocabularies do."""
    texts = ["Yes yes No no. yes Yes no No\n" + " ".join(f"{d} {d}" for d in "12345")] * 50
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    out = tmp_path_factory.mktemp("judge") / "model"
    save_model(model, tokenizer, out)
    return out


class _FixedLogits(torch.nn.Module):
    """A stand-in judge model whose next-token logits are set by hand."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def _set_logits(judge, by_text: dict[str, float]) -> None:
    logits = torch.full((len(judge.tokenizer),), -30.0)
    for text, value in by_text.items():
        (token,) = judge.tokenizer(text, add_special_tokens=False)["input_ids"]
        logits[token] = value
    judge.model = _FixedLogits(logits)


def test_llm_judge_sums_the_answer_spellings(variants_dir):
    from rlhfkit.eval.llm_judge import LLMJudge

    judge = LLMJudge(variants_dir)
    # Most mass on "Yes"; lowercase "no" beats lowercase "yes": reading "yes"/"no" only says no.
    spellings = {"Yes": 3.0, " Yes": 1.0, "yes": -2.0, "No": 0.0, "no": 1.0, " no": -1.0}
    _set_logits(judge, spellings)
    mass = {text: math.exp(v) for text, v in spellings.items()}
    yes = mass["Yes"] + mass[" Yes"] + mass["yes"]
    expected = yes / (yes + mass["No"] + mass["no"] + mass[" no"])
    assert expected > 0.8
    assert judge(PROMPTS[:2], [GOOD, ""]) == pytest.approx([expected, expected], abs=1e-5)

    judge = LLMJudge(variants_dir, mode="score", top_score=5)
    _set_logits(judge, {" 4": 2.0, "4": 0.0, "2": 1.0})
    mass4, mass2 = math.exp(2.0) + 1.0, math.exp(1.0)
    assert judge.utility(PROMPTS[0], GOOD) == pytest.approx(
        (4 * mass4 + 2 * mass2) / (mass4 + mass2), abs=1e-4
    )


# ---- feedback store export -> DPO here and TRL's DPOTrainer ----------------------------------


@pytest.fixture
def exported_pairs(tmp_path) -> Path:
    from rlhfkit.feedback.store import FeedbackStore

    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}", seed=0, durable=False)
    project = store.create_project("cities")
    store.add_items(project, [{"prompt": p, "responses": list(_lists(i))} for i, p in enumerate(PROMPTS[:6])])
    annotator = store.add_annotator("ann", kind="simulated")
    while (task := store.next_task(project, annotator)) is not None:
        store.submit_comparison(task.token, annotator, "left")
    path = tmp_path / "pairs.jsonl"
    assert store.export_preferences(project, path) == 6
    store.close()
    return path


def test_feedback_export_trains_dpo_without_conversion(sft_dir, exported_pairs, tmp_path):
    from rlhfkit.pipeline import Run, _training_pairs

    cfg = load_config(overrides=[*TINY, f"data.preferences={exported_pairs}", "dpo.epochs=2"])
    run = Run(tmp_path / "run", cfg, show_progress=False)
    pairs = _training_pairs(run)
    assert len(pairs) == 6
    from rlhfkit.train.dpo import run_dpo

    summary = run_dpo(cfg, sft_dir, pairs, tmp_path / "dpo", show_progress=False)
    assert summary["n_pairs"] == 6 and (tmp_path / "dpo" / "model" / "config.json").is_file()


def test_feedback_export_loads_in_trl_dpo_trainer(sft_dir, exported_pairs, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is a dev extra: pip install -e '.[dev]'")
    from datasets import load_dataset

    from rlhfkit.models.loading import load_tokenizer

    dataset = load_dataset("json", data_files=str(exported_pairs), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    tokenizer = load_tokenizer(sft_dir)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        max_length=64,
    )
    trainer = trl.DPOTrainer(
        model=load_causal_lm(sft_dir), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)


@pytest.fixture(scope="module")
def gpt2_judge_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 judge with 128 learned positions (n_positions), whose vocabulary knows the rubric."""
    from rlhfkit.eval.llm_judge import YES_NO_RUBRIC

    texts = [YES_NO_RUBRIC + " yes no Yes No " + GOOD + " ".join(PROMPTS)] * 50
    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = tiny_causal_lm(tokenizer, "gpt2", 32, 1, 2, 64, max_positions=128)
    out = tmp_path_factory.mktemp("gpt2-judge") / "model"
    save_model(model, tokenizer, out)
    return out


def test_llm_judge_keeps_within_a_learned_position_table(gpt2_judge_dir):
    from rlhfkit.eval.llm_judge import LLMJudge

    long = "\n".join([GOOD] * 40)
    # By default the query is cut to the 128 positions the model has, not to 512.
    judge = LLMJudge(gpt2_judge_dir)
    assert judge.max_length == 128 and judge.positions.positions == 128
    (score,) = judge([PROMPTS[0]], [long])
    assert 0.0 <= score <= 1.0
    # A max_length beyond the table is refused before the judge reads a query, naming both.
    judge = LLMJudge(gpt2_judge_dir, max_length=512)
    assert len(judge([PROMPTS[0]], ["1. Paris"])) == 1  # a query that fits is judged
    with pytest.raises(ValueError) as info:
        judge([PROMPTS[0], PROMPTS[1]], ["1. Paris", long])
    message = str(info.value)
    assert "LLM judge max_length=512 exceeds the 128 positions of the learned position embeddings" in message
    assert "(gpt2, n_positions)" in message and "judge query 2 has" in message
    assert "lower LLM judge max_length to 128 or less" in message
