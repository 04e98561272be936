"""`rlhfkit loop`: online iterated RLHF on a tiny local model and the built-in top-5 task."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from feedback_server import free_port, running_server
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.config import ConfigError, load_config
from rlhfkit.crowd.aggregate import PairVote
from rlhfkit.crowd.simulate import default_pool, simulate_annotation
from rlhfkit.data.io import read_records
from rlhfkit.feedback.store import FeedbackStore
from rlhfkit.loop import (
    PASSWORD_ENV,
    ROUND_KEYS,
    LabelTimeout,
    evaluate_round,
    loop_config,
    open_feedback,
    pick_prompts,
    round_fingerprint,
    run_loop,
    votes_from_raw,
    wait_for_labels,
)
from rlhfkit.models.loading import save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.pipeline import Run, StageError, comparison_items
from rlhfkit.tasks import load_task

# Tiny everything: a random-init model, a few dozen comparisons, two PPO iterations a round.
# PPO's learning rate is high so that one round's policy samples visibly differ from SFT's.
TINY = [
    "sft.epochs=0.5",
    "sft.max_length=64",
    "feedback.n_prompts=24",
    # One label on most items: on a random-init model's near-identical samples, three labels per
    # item end in ties, and the reward model would see too few pairs to show it grew.
    "feedback.overlap_share=0.3",
    "feedback.max_new_tokens=8",
    "rm.epochs=1",
    "rm.batch_size=8",
    "rm.max_length=64",
    "rm.val_share=0",
    "ppo.steps=2",
    "ppo.rollout_batch=8",
    "ppo.minibatch=4",
    "ppo.max_new_tokens=8",
    "ppo.reward_norm_samples=8",
    "ppo.save_every=0",
    "ppo.lr=0.01",
    "eval.n_prompts=8",
    "eval.heldout_pairs=8",
    "eval.max_new_tokens=8",
    "eval.n_samples=2",
    "loop.prompts_per_round=16",
]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A random-init Llama with a tokenizer trained on top-5 text, standing in for a pretrained base."""
    folder = tmp_path_factory.mktemp("loop-base") / "base"
    task = load_task("rlhfkit.tasks.top5", 0)
    texts = task.corpus[:400] + [d["prompt"] + " " + d["completion"] for d in task.demonstrations]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = tiny_causal_lm(
        tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=128
    )
    save_model(model, tokenizer, folder)
    return folder


def _sets(base_model: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={base_model}", *TINY, *extra]


def _cli_args(base_model: Path, *extra: str) -> list[str]:
    return [arg for s in _sets(base_model, *extra) for arg in ("--set", s)]


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory, base_model) -> tuple[Path, str]:
    """`rlhfkit loop --rounds 2` through the command (in process: a subprocess costs imports only)."""
    out = tmp_path_factory.mktemp("loop") / "run"
    args = ["loop", "--rounds", "2", "--out", str(out), "--no-progress", *_cli_args(base_model)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    return out, result.output


def _summary(run_dir: Path, k: int) -> dict:
    return json.loads((run_dir / "loop" / f"round-{k}" / "summary.json").read_text())


def _copy_through_round_one(run_dir: Path, dest: Path) -> Path:
    """A copy of the run with round 1 finished and nothing of round 2 (its files, its store project)."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "loop" / "round-2")
    # Round 1's labels live on in its summaries; the store only holds items still to collect.
    (dest / "feedback.db").unlink()
    return dest


@pytest.mark.slow
def test_two_rounds_write_every_round_to_the_report(loop_run):
    out, stdout = loop_run
    report = json.loads((out / "report.json").read_text())
    rounds = report["loop"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(ROUND_KEYS) <= set(r)
        assert {"rate", "ci95", "n"} <= set(r["win_rate_vs_sft"])
        assert r["win_rate_vs_sft"]["n"] == 8
        assert r["gold_reward"] is not None and r["kl_from_sft"] is not None
    # Round 2 adds its own labels and pairs to round 1's.
    assert rounds[1]["n_labels_total"] > rounds[0]["n_labels_total"] == report["feedback"]["n_labels"]
    assert rounds[1]["n_pairs_total"] > rounds[0]["n_pairs_total"]
    assert rounds[0]["policy"] == "ppo/model" and rounds[1]["policy"] == "loop/round-2/ppo/model"
    # Every round compares loop.prompts_per_round prompts (16 here), round 1's feedback stage too,
    # and the run's config.yaml says so.
    assert load_config(out / "config.yaml").feedback.n_prompts == 16
    assert all(0 < _summary(out, k)["n_items"] <= 16 for k in (1, 2))
    round2 = out / "loop" / "round-2"
    for path in ("pairs.jsonl", "raw.jsonl", "prompts.jsonl", "summary.json", "samples.jsonl"):
        assert (round2 / path).stat().st_size > 0
    for model in ("rm/model", "ppo/model"):
        assert (round2 / model / "config.json").is_file()
    assert report["stages"]["loop/round-2"]["wall_seconds"] > 0
    html = (out / "report.html").read_text()
    assert '<h2 id="loop">Iterated RLHF</h2>' in html
    assert html.index('id="loop"') < html.index('id="stages"')
    assert "gold reward and win rate per round" in html
    assert "Iterated RLHF: each round's policy vs SFT" in " ".join(stdout.split())


def test_loop_config_gives_round_one_the_per_round_budget():
    config = load_config(None, ["loop.prompts_per_round=123"])
    assert config.feedback.n_prompts == 800 and loop_config(config).feedback.n_prompts == 123
    assert loop_config(loop_config(config)) == loop_config(config)
    unset = config.model_copy(update={"loop": config.loop.model_copy(update={"prompts_per_round": None})})
    assert loop_config(unset) is unset


@pytest.mark.slow
def test_round_two_labels_are_on_samples_of_round_one_policy(loop_run):
    out, _ = loop_run
    summary = _summary(out, 2)
    assert summary["sampled_from"] == "ppo/model"
    config = load_config(out / "config.yaml")
    store = FeedbackStore(out / "feedback.db")
    try:
        project = store.project_id(summary["project"])
        items = store.items(project)
        labels = store.labels(project)
    finally:
        store.close()
    assert {item.meta["policy"] for item in items} == {"ppo/model"}
    assert {label.item_id for label in labels} == {item.item_id for item in items}
    # loop.compare_with=sft (the default): one response of each item is SFT's, the other the policy's.
    assert config.loop.compare_with == "sft"
    assert all(sorted(item.meta["sampled_from"]) == ["ppo/model", "sft/model"] for item in items)
    stored = {(item.prompt, frozenset(item.responses)) for item in items}
    prompts = [r.prompt for r in read_records(out / "loop" / "round-2" / "prompts.jsonl", "prompt")]
    partner = (out / "sft" / "model", "sft/model")

    def resample(policy: Path) -> set:
        made = comparison_items(
            policy, prompts, config.feedback, config.seed + 2, random.Random(0), "x", partner
        )
        return {(item["prompt"], frozenset(item["responses"])) for item in made}

    # Against SFT's samples, the round-1 PPO policy reproduces the stored comparisons exactly
    # (positions are drawn per item, hence sets); the SFT policy in its place does not.
    assert resample(out / "ppo" / "model") == stored
    assert resample(out / "sft" / "model") != stored
    # No round-2 prompt was compared in round 1 while unused prompts were left.
    round_one = {r.prompt for r in read_records(out / "feedback" / "pairs.jsonl", "preference")}
    assert not round_one & set(prompts)


@pytest.mark.slow
def test_round_two_reward_model_is_trained_on_all_pairs(loop_run):
    out, _ = loop_run
    summary = _summary(out, 2)
    n_first = len(read_records(out / "feedback" / "pairs.jsonl", "preference"))
    n_second = len(read_records(out / "loop" / "round-2" / "pairs.jsonl", "preference"))
    assert summary["n_pairs"] == n_second > 0
    # Every labelled item gave a pair or is counted as giving none.
    assert summary["n_pairs"] + summary["n_undecided"] + summary["n_identical_skipped"] <= summary["n_items"]
    assert summary["rm_train_pairs"] == summary["n_pairs_total"] == n_first + n_second  # rm.val_share=0
    rm_steps = json.loads((out / "rm" / "summary.json").read_text())["steps"]
    assert len((out / "loop" / "round-2" / "rm" / "metrics.jsonl").read_text().splitlines()) > rm_steps


def _first_kl(metrics: Path) -> float:
    return json.loads(metrics.read_text().splitlines()[0])["kl"]


@pytest.mark.slow
def test_later_rounds_restart_ppo_from_sft_or_continue_the_policy(loop_run, base_model, tmp_path):
    out, _ = loop_run
    # Default: round 2's PPO starts from SFT, so its first rollout has no KL from the SFT reference.
    assert _summary(out, 2)["ppo_from"] == "sft"
    # loop.aggregate unset: the round's labels are aggregated as round 1's, by feedback.aggregate.
    assert _summary(out, 2)["aggregate"] == load_config(out / "config.yaml").feedback.aggregate == "ds"
    # (Within the log-prob invariance tolerance: the rollout and the reference score in batches
    # laid out differently.)
    assert _first_kl(out / "loop" / "round-2" / "ppo" / "metrics.jsonl") == pytest.approx(0.0, abs=1e-4)
    # ppo_from=previous continues round 1's policy: KL from SFT before its first update already.
    again = _copy_through_round_one(out, tmp_path / "run")
    config = load_config(None, _sets(base_model, "loop.rounds=2", "loop.ppo_from=previous"))
    run_loop(Run(again, config, show_progress=False, resume=True))
    assert _summary(again, 2)["ppo_from"] == "previous"
    assert _first_kl(again / "loop" / "round-2" / "ppo" / "metrics.jsonl") > 1e-2


@pytest.mark.slow
def test_rerun_reuses_finished_rounds_and_adds_new_ones(loop_run, base_model, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(loop_run[0], out)
    before = _summary(out, 2)
    config = load_config(None, _sets(base_model, "loop.rounds=3"))
    report = run_loop(Run(out, config, show_progress=False, resume=True))
    assert _summary(out, 2) == before  # reused, not recomputed
    assert [r["round"] for r in report["loop"]["rounds"]] == [1, 2, 3]
    third = _summary(out, 3)
    assert third["sampled_from"] == "loop/round-2/ppo/model"
    assert third["n_labels_total"] > before["n_labels_total"]


def test_round_fingerprint_follows_what_a_round_computes(tmp_path):
    def fingerprint(*sets: str) -> str:
        return round_fingerprint(Run(tmp_path / "run", load_config(None, list(sets)), show_progress=False), 2)

    base = fingerprint()
    # Where labels come from and how long to wait for them do not change a finished round.
    assert fingerprint("loop.rounds=7", "loop.label_timeout=5", "loop.feedback_url=http://x:1") == base
    for changed in (
        "loop.aggregate=ds",
        "loop.prompts_per_round=9",
        "loop.ppo_from=previous",
        "eval.n_prompts=4",
        "rm.epochs=3",
    ):
        assert fingerprint(changed) != base, changed


@pytest.mark.slow
def test_feedback_url_round_is_labelled_over_http(loop_run, base_model, tmp_path, monkeypatch):
    out = _copy_through_round_one(loop_run[0], tmp_path / "run")
    service_store = FeedbackStore(tmp_path / "service.db", seed=0, durable=False)
    service_store.add_user("boss", "admin", "boss-password-1")
    monkeypatch.setenv(PASSWORD_ENV, "boss-password-1")
    try:
        with running_server(service_store) as url:
            config = load_config(
                None,
                _sets(base_model, "loop.rounds=2", f"loop.feedback_url={url}", "loop.feedback_user=boss"),
            )
            run_loop(Run(out, config, show_progress=False, resume=True))
        summary = _summary(out, 2)
        assert summary["source"] == url
        project = service_store.project_id(summary["project"])
        labels = service_store.labels(project)
        # Every simulated annotator labelled as a user of the service, through its API.
        users = {user.name for user in service_store.users()}
        assert {label.annotator for label in labels} <= users
        assert {p.name for p in default_pool()} <= users
        assert summary["n_labels"] == len(labels) > 0
        assert not (out / "feedback.db").exists()  # nothing went through the run's own store
        accounts = out / "loop" / "simulated_accounts.json"
        assert accounts.stat().st_mode & 0o777 == 0o600
    finally:
        service_store.close()


def test_a_round_cut_off_between_item_requests_sends_the_rest_next_time(
    loop_run, base_model, tmp_path, monkeypatch
):
    """Items go to a service in several requests; an attempt that died after the first must not
    leave the round with part of its comparisons (the next attempt sends the rest, once)."""
    import rlhfkit.loop as loop_module
    from rlhfkit.feedback.client import FeedbackClient

    out = _copy_through_round_one(loop_run[0], tmp_path / "run")
    service_store = FeedbackStore(tmp_path / "service.db", seed=0, durable=False)
    service_store.add_user("boss", "admin", "boss-password-1")
    monkeypatch.setenv(PASSWORD_ENV, "boss-password-1")
    monkeypatch.setattr(loop_module, "ITEMS_PER_REQUEST", 3)
    real_add = FeedbackClient.add_items
    calls = []

    def add_then_die(self, project_id, items):
        calls.append(len(items))
        if len(calls) == 2:
            raise ConnectionError("the service went away")
        return real_add(self, project_id, items)

    try:
        with running_server(service_store) as url:
            sets = _sets(base_model, "loop.rounds=2", f"loop.feedback_url={url}", "loop.feedback_user=boss")
            config = load_config(None, sets)
            monkeypatch.setattr(FeedbackClient, "add_items", add_then_die)
            with pytest.raises(ConnectionError):
                run_loop(Run(out, config, show_progress=False, resume=True))
            (project,) = [p for p in service_store.projects() if "-loop2-" in p.name]
            assert service_store.progress(project.project_id)["n_items"] == 3
            monkeypatch.setattr(FeedbackClient, "add_items", real_add)
            run_loop(Run(out, config, show_progress=False, resume=True))
        saved = json.loads(next((out / "loop" / "round-2").glob("items-*.jsonl")).read_text().splitlines()[0])
        items = service_store.items(project.project_id)
        assert len(items) == _summary(out, 2)["n_items"] > 3
        assert items[0].prompt == saved["prompt"] and items[0].responses == saved["responses"]
        assert len({(i.prompt, tuple(i.responses)) for i in items}) == len(items)  # none sent twice
    finally:
        service_store.close()


@pytest.mark.slow
def test_cli_says_clearly_when_humans_have_not_labelled(loop_run, base_model, tmp_path):
    out = _copy_through_round_one(loop_run[0], tmp_path / "run")
    extra = ["loop.annotators=human", "loop.label_timeout=0.3", "loop.poll_seconds=0.1"]
    result = CliRunner().invoke(
        app, ["loop", "--rounds", "2", "--out", str(out), "--no-progress", *_cli_args(base_model, *extra)]
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "error:" in message and "0 of" in message and "have not finished" in message
    assert "run `rlhfkit loop` again" in message
    # The round's comparisons wait in the store for people; nothing was labelled or trained.
    store = FeedbackStore(out / "feedback.db")
    try:
        progress = [store.progress(p.project_id) for p in store.projects() if "-loop2-" in p.name]
    finally:
        store.close()
    assert len(progress) == 1 and progress[0]["n_items"] > 0 and progress[0]["n_labels"] == 0
    assert not (out / "loop" / "round-2" / "summary.json").exists()


class FakeClock:
    """monotonic() and sleep() that only move when slept."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_for_labels_returns_once_enough_items_are_complete():
    clock = FakeClock()
    answers = iter([0, 2, 3, 4])

    def progress():
        return {"n_items": 4, "n_items_complete": next(answers), "n_labels": 9}

    got = wait_for_labels(progress, 0.75, 60, 5, "round 2", clock=clock, sleep=clock.sleep)
    assert got["n_items_complete"] == 3  # ceil(0.75 * 4) = 3 items were enough
    assert clock.now == 10.0  # two polls of 5 s


def test_wait_for_labels_times_out_with_how_far_labelling_got():
    clock = FakeClock()

    def progress():
        return {"n_items": 10, "n_items_complete": 4, "n_labels": 4}

    with pytest.raises(LabelTimeout) as caught:
        wait_for_labels(progress, 1.0, 12, 5, "round 3, project 'p'", clock=clock, sleep=clock.sleep)
    message = str(caught.value)
    assert message.startswith("round 3, project 'p': only 4 of 10 items")
    assert "after waiting 12s" in message and "needs 10" in message
    assert clock.now == 12.0  # 5 + 5 + the 2 s left


def test_pick_prompts_prefers_prompts_compared_least():
    pool = ["a", "b", "c", "d"]
    picked = pick_prompts(pool, ["a", "b", "b"], 3, random.Random(0))
    assert sorted(picked[:2]) == ["c", "d"] and picked[2] == "a"
    # More prompts than the pool: every prompt, then round again in the same order.
    picked = pick_prompts(pool, [], 6, random.Random(1))
    assert sorted(picked[:4]) == pool and picked[4:] == picked[:2]
    with pytest.raises(StageError, match="no training prompts"):
        pick_prompts([], [], 3, random.Random(0))


def test_votes_from_raw_leaves_out_golden_items():
    rows = [
        {
            "item_id": 1,
            "annotator": "x",
            "order": [1, 0],
            "chosen": 0,
            "prompt": "p",
            "responses": ["a", "b"],
        },
        {
            "item_id": 2,
            "annotator": "x",
            "order": [0, 1],
            "chosen": 1,
            "prompt": "q",
            "responses": ["c", "d"],
            "golden": True,
        },
    ]
    votes, items = votes_from_raw(rows)
    assert votes == [PairVote(1, "x", 1, 0, 0)]
    assert list(items) == [1] and items[1].responses == ["a", "b"]


def test_report_html_shows_the_rounds_before_the_stage_timings(tmp_path):
    from rlhfkit.eval.report import write_html_report

    rounds = [
        {
            "round": k,
            "n_labels_total": 10 * k,
            "n_pairs_total": 7 * k,
            "rm_heldout_accuracy": 0.625,
            "gold_reward": 0.1 * k,
            "proxy_reward": 0.2,
            "kl_from_sft": 1.5,
            "win_rate_vs_sft": {"rate": 0.6, "ci95": [0.4, 0.75], "n": 20},
        }
        for k in (1, 2)
    ]
    report = {"task": "t", "loop": {"rounds": rounds}, "stages": {"sft": {"wall_seconds": 1.0}}}
    # Any later write of the report (eval, demo) keeps the section: it is part of the template.
    out = write_html_report(tmp_path, report).read_text()
    assert out.index('<h2 id="loop">') < out.index('<h2 id="stages">')
    assert "0.6 [0.4, 0.75]" in out and '<td class="num">0.625</td>' in out
    assert out.count('alt="gold reward and win rate per round"') == 1


def test_a_simulated_pool_too_small_for_the_overlap_is_refused_before_any_stage(tmp_path):
    """Nine simulated annotators cannot give an item ten labels: the loop says so before it trains
    (rather than wait loop.label_timeout in round 2 for labels no one is left to give)."""
    missing = tmp_path / "no-model"  # were the loop to start, SFT would fail on this
    config = load_config(None, [f"model.name_or_path={missing}", "feedback.overlap=10", "loop.rounds=2"])
    with pytest.raises(StageError, match=r"feedback\.overlap=10 .* pool has 9 annotators"):
        run_loop(Run(tmp_path / "run", config, show_progress=False))
    assert not (tmp_path / "run" / "sft").exists()


def test_an_llm_judge_without_a_judge_model_is_refused_before_any_stage(tmp_path):
    """eval.judge: llm was silently replaced by gold in every round; now the loop uses it, so a
    missing eval.judge_model is an error at the start, not after round 1's training."""
    missing = tmp_path / "no-model"  # were the loop to start, SFT would fail on this
    config = load_config(None, [f"model.name_or_path={missing}", "eval.judge=llm", "loop.rounds=2"])
    with pytest.raises(StageError, match=r"eval\.judge is 'llm' .*eval\.judge_model"):
        run_loop(Run(tmp_path / "run", config, show_progress=False))
    assert not (tmp_path / "run" / "sft").exists()


def test_evaluate_round_uses_the_configured_llm_judge(base_model, tmp_path, monkeypatch):
    """The round's win rate is decided by the LLM judge the user configured, not by gold."""
    from rlhfkit.eval import evaluate

    loaded = []

    def judge(prompts, responses):
        return [float(len(r)) for r in responses]

    def load(model):
        loaded.append(model)
        return judge

    monkeypatch.setattr(evaluate, "load_llm_judge", load)
    sets = ["eval.judge=llm", "eval.judge_model=my-judge", "eval.n_prompts=3", "eval.heldout_pairs=0"]
    config = load_config(None, _sets(base_model, *sets))
    run = Run(tmp_path / "run", config, show_progress=False)
    shutil.copytree(base_model, run.stage_dir("sft") / "model")
    figures = evaluate_round(run, base_model, base_model, "round-1")
    assert loaded == ["my-judge"]
    assert figures["judge"] == "llm" and figures["llm_score"] is not None
    assert figures["win_rate_vs_sft"]["n"] == 3
    # A judge the loop already loaded is used as given, not loaded again.
    again = evaluate_round(run, base_model, base_model, "round-2", lambda: judge)
    assert loaded == ["my-judge"] and again["win_rate_vs_sft"] == figures["win_rate_vs_sft"]


def test_the_loop_loads_its_llm_judge_once_for_all_rounds(tmp_path, monkeypatch):
    """Every round is judged by the same LLM judge: one load per loop run, not one per round."""
    import rlhfkit.loop as loop
    from rlhfkit.eval import evaluate

    loaded = []

    def load(model):
        loaded.append(model)
        return lambda prompts, responses: [0.0] * len(responses)

    def a_round(run, k, llm_judge):
        llm_judge()  # what evaluate_round does with it
        return {
            "round": k,
            "policy": "ppo/model" if k == 1 else f"loop/round-{k}/ppo/model",
            "n_labels_total": 10 * k,
            "n_pairs_total": 5 * k,
            "rm_heldout_accuracy": None,
            "gold_reward": 0.5,
            "kl_from_sft": 0.1,
            "win_rate_vs_sft": {"rate": 0.5, "ci95": [0.3, 0.7], "n": 8},
            "judge": "llm",
            "judge_model": "my-judge",
            "wall_seconds": 1.0,
        }

    monkeypatch.setattr(evaluate, "load_llm_judge", load)
    monkeypatch.setattr(loop, "run_stage", lambda run, stage, reuse=False: {})
    monkeypatch.setattr(loop, "_first_round", lambda run, fingerprint, judge: a_round(run, 1, judge))
    monkeypatch.setattr(
        loop, "_later_round", lambda run, k, previous, fingerprint, judge: a_round(run, k, judge)
    )
    sets = ["eval.judge=llm", "eval.judge_model=my-judge", "loop.rounds=3", "loop.annotators=human"]
    report = run_loop(Run(tmp_path / "run", load_config(None, sets), show_progress=False))
    assert loaded == ["my-judge"]
    # report.json names the judge of every round.
    rounds = report["loop"]["rounds"]
    assert [(r["judge"], r["judge_model"]) for r in rounds] == [("llm", "my-judge")] * 3


def test_loop_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="loop.aggregate"):
        load_config(None, ["loop.aggregate=median"])
    with pytest.raises(ConfigError, match="loop.rounds"):
        load_config(None, ["loop.rounds=0"])
    result = CliRunner().invoke(app, ["loop", "--rounds", "0", "--out", "unused"])
    assert result.exit_code == 2 and "--rounds 0" in result.output


def test_feedback_service_problems_are_clear_errors(tmp_path, monkeypatch):
    def service(url: str) -> Run:
        return Run(tmp_path / "run", load_config(None, [f"loop.feedback_url={url}"]), show_progress=False)

    unreachable = f"http://127.0.0.1:{free_port()}"
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(StageError, match=PASSWORD_ENV):
        open_feedback(service(unreachable), 2)
    monkeypatch.setenv(PASSWORD_ENV, "secret")
    with pytest.raises(StageError, match="cannot be reached"):
        open_feedback(service(unreachable), 2)
    with pytest.raises(ConfigError, match="loop.feedback_url"):
        load_config(None, ["loop.feedback_url=localhost:8000"])
    result = CliRunner().invoke(app, ["loop", "--feedback-url", "ftp://x", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--feedback-url ftp://x" in result.output


def test_comparison_items_with_a_partner_pair_the_policy_against_it(base_model, tmp_path):
    """loop.compare_with=sft: one response of every item is the partner's, at a drawn position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A second model: the base with its weights perturbed, so its samples differ from the base's.
    partner = tmp_path / "partner"
    model = AutoModelForCausalLM.from_pretrained(base_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    save_model(model, AutoTokenizer.from_pretrained(base_model), partner)
    config = load_config(None, _sets(base_model))
    prompts = load_task("rlhfkit.tasks.top5", 0).train_prompts[:24]
    mixed = comparison_items(
        base_model, prompts, config.feedback, 5, random.Random(0), "ppo", (partner, "sft")
    )
    # Each model on its own with the same seed: slot 0 is the partner's draw, slot 1 the policy's.
    alone = {
        name: comparison_items(path, prompts, config.feedback, 5, random.Random(0), name)
        for path, name in ((partner, "sft"), (base_model, "ppo"))
    }
    assert all("sampled_from" not in item["meta"] for items in alone.values() for item in items)
    by_prompt = {name: {i["prompt"]: i["responses"] for i in items} for name, items in alone.items()}
    assert mixed
    positions = set()
    for item in mixed:
        sources = item["meta"]["sampled_from"]
        assert sorted(sources) == ["ppo", "sft"] and item["meta"]["policy"] == "ppo"
        position = sources.index("sft")
        positions.add(position)
        prompt = item["prompt"]
        if prompt in by_prompt["sft"]:
            assert item["responses"][position] == by_prompt["sft"][prompt][0]
        if prompt in by_prompt["ppo"]:
            assert item["responses"][1 - position] == by_prompt["ppo"][prompt][1]
    assert positions == {0, 1}


RANKING = ("feedback.completions_per_prompt=3", "feedback.overlap=2", "feedback.overlap_share=1")


def test_ranking_feedback_is_sampled_ranked_over_http_and_split_into_pairs(base_model, tmp_path):
    """feedback.completions_per_prompt=3: ranking items, labelled by the pool through the service."""
    from rlhfkit.feedback.client import HttpAnnotators
    from rlhfkit.tasks.top5.gold import gold_utility

    config = load_config(None, _sets(base_model, *RANKING))
    assert config.feedback.task_type == "ranking"
    prompts = load_task("rlhfkit.tasks.top5", 0).train_prompts[:12]
    items = comparison_items(base_model, prompts, config.feedback, 0, random.Random(0), "base")
    assert items
    for item in items:
        assert 2 <= len(item["responses"]) <= 3
        assert len(set(item["responses"])) == len(item["responses"])
        assert all(r.strip() for r in item["responses"])
    pool = default_pool()[:3]
    with FeedbackStore(tmp_path / "service.db", seed=0, durable=False) as store:
        project = store.create_project("ranks", task_type="ranking", overlap=1)
        store.add_items(project, items)
        passwords = {p.name: f"{p.name}-password" for p in pool}
        for name, password in passwords.items():
            store.add_user(name, "annotator", password)
        with running_server(store) as url:
            simulate_annotation(HttpAnnotators(url, passwords), project, pool, gold_utility, seed=0)
        store.export_raw(project, tmp_path / "raw.jsonl")
        labels = store.labels(project)
    assert len(labels) == 2 * len(items) and {label.kind for label in labels} == {"ranking"}
    rows = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text().splitlines()]
    votes, by_id = votes_from_raw(rows)
    k_of = {item_id: len(item.responses) for item_id, item in by_id.items()}
    assert len(votes) == sum(2 * k * (k - 1) // 2 for k in k_of.values())
    for vote in votes:
        assert vote.left < vote.right < k_of[vote.item_id] and vote.chosen in (vote.left, vote.right)


def test_a_sampled_nul_reaches_the_store_as_a_replacement_character(base_model, monkeypatch, tmp_path):
    """A byte-level tokenizer can sample byte 0, which no feedback database stores: the sampled
    text keeps a visible U+FFFD in its place, and the item is stored (SQLite here; PostgreSQL alike)."""
    import rlhfkit.rollout.generate as generate
    from rlhfkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(base_model)
    nul = tokenizer("1. A\x00B", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(nul) == "1. A\x00B"
    plain = tokenizer("1. C", add_special_tokens=False)["input_ids"]
    draws = iter([nul, plain])
    monkeypatch.setattr(
        generate, "sample_responses", lambda model, starts, **kw: [next(draws) for _ in starts]
    )
    config = load_config(None, _sets(base_model))
    prompts = load_task("rlhfkit.tasks.top5", 0).train_prompts[:1]
    (item,) = comparison_items(base_model, prompts, config.feedback, 0, random.Random(0), "base")
    assert item["responses"] == ["1. A\ufffdB", "1. C"]
    with FeedbackStore(tmp_path / "nul.db", seed=0, durable=False) as store:
        project = store.create_project("nul", task_type="comparison", overlap=1)
        store.add_items(project, [item])
        assert store.items(project)[0].responses == ["1. A\ufffdB", "1. C"]
