"""The whole loop, end to end, through the real command: `rlhfkit demo --preset fast`."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.data.io import source_digest, write_jsonl
from rlhfkit.pipeline import METHOD_STAGES, STAGES, Run

REPORT_KEYS = {
    "task",
    "seed",
    "wall_seconds",
    "stages",
    "rm",
    "eval",
    "feedback",
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    cmd = [sys.executable, "-m", "rlhfkit", "demo", "--preset", "fast", "--out", str(out), "--no-progress"]
    # A guard against a hang, not a speed test: the fast demo takes 3 to 6 minutes alone on 2 cores,
    # and more than 15 on a machine that is busy with other jobs.
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Libraries' notices about this machine (no GPU; no optional 4-bit kernel) are not the run's output.
    assert "Setting accelerator to CPU" not in result.stdout
    assert "gemm_4bit_forward" not in result.stderr
    return out, result.stdout


@pytest.mark.slow
def test_demo_writes_the_run_directory_contract(demo_run):
    out, stdout = demo_run
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["task"] == "top5" and report["seed"] == 0
    for stage in ("pretrain", "sft", "feedback", "rm", "ppo", "eval"):
        assert report["stages"][stage]["wall_seconds"] > 0
    for stage in ("pretrain", "sft", "rm", "ppo"):
        assert (out / stage / "model" / "config.json").is_file()
        assert (out / stage / "metrics.jsonl").stat().st_size > 0
    assert {"heldout_accuracy", "gold_agreement", "n_train_pairs"} <= set(report["rm"])
    # Probes: one known defect per pair, on every held-out prompt, judged by the RM and by SFT's likelihood.
    from rlhfkit.tasks.top5.probes import KINDS

    probes = report["rm"]["probes"]
    assert set(probes) == set(KINDS)
    for entry in probes.values():
        assert entry["n"] > 0 and 0.0 <= entry["reward_model"] <= 1.0 and 0.0 <= entry["policy_loglik"] <= 1.0
    for policy in ("sft", "ppo"):
        entry = report["eval"]["policies"][policy]
        assert {"gold_reward", "proxy_reward", "kl_from_sft"} <= set(entry)
        assert math.isfinite(entry["kl_from_sft"])
    win = report["eval"]["win_rate_vs_sft"]["ppo"]
    assert win["n"] > 0 and win["ci95"][0] <= win["rate"] <= win["ci95"][1]
    assert {"n_labels", "n_annotators", "agreement_alpha"} <= set(report["feedback"])
    assert report["feedback"]["n_labels"] > report["feedback"]["n_items"]  # overlap on a share
    # Every labelled item gave a pair, or is counted as giving none (no winner, identical responses).
    fb = report["stages"]["feedback"]
    assert fb["n_pairs"] + fb["n_undecided"] + fb["n_identical_skipped"] <= fb["n_items"]
    assert fb["n_pairs"] == report["feedback"]["n_pairs"] > 0
    assert (out / "feedback.db").is_file() and (out / "config.yaml").is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    # The label-efficiency curve: RMs on a quarter and a half of the labels, then the run's own RM.
    curve = report["rm"]["label_curve"]
    assert [p["fraction"] for p in curve] == [0.25, 0.5, 1.0]
    assert (
        curve[0]["n_labels"] < curve[1]["n_labels"] < curve[2]["n_labels"] == report["feedback"]["n_labels"]
    )
    assert (
        curve[0]["n_labels"] >= 0.25 * curve[2]["n_labels"]
        and curve[1]["n_labels"] >= 0.5 * curve[2]["n_labels"]
    )
    assert all(0 < p["n_train_pairs"] < p["n_pairs"] and 0.0 <= p["heldout_accuracy"] <= 1.0 for p in curve)
    assert curve[2]["heldout_accuracy"] == report["rm"]["heldout_accuracy"]
    assert curve[2]["n_train_pairs"] == report["rm"]["n_train_pairs"]
    assert 'id="label-curve-table"' in html
    assert 'id="probes"' in html and "duplicate_item" in html
    assert 'alt="reward-model held-out accuracy against the number of labels"' in html
    assert not list((out / "eval" / "label_curve").rglob("*.safetensors"))  # trained, not saved
    # The printed table: both policies and the win rate.
    assert "ppo" in stdout and "win rate" in stdout
    # The resolved config reproduces the run.
    assert load_config(out / "config.yaml").seed == 0


@pytest.mark.slow
def test_demo_learns_something(demo_run):
    """Even the fast preset's reward model beats chance on gold-labelled pairs, and PPO moves."""
    out, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    assert report["rm"]["heldout_accuracy"] > 0.6
    assert report["eval"]["policies"]["ppo"]["kl_from_sft"] > 0
    policies = report["eval"]["policies"]
    assert policies["ppo"]["proxy_reward"] > policies["sft"]["proxy_reward"]


@pytest.mark.slow
def test_checkpoints_load_with_plain_transformers(demo_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out, _ = demo_run
    tokenizer = AutoTokenizer.from_pretrained(out / "ppo" / "model")
    assert tokenizer.chat_template and tokenizer.pad_token and tokenizer.eos_token and tokenizer.bos_token
    policy = AutoModelForCausalLM.from_pretrained(out / "ppo" / "model")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Give me the top 5 horror films."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    generated = policy.generate(**ids, max_new_tokens=20, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "model")
    with torch.no_grad():
        assert rm(**ids).logits.shape == (1, 1)


@pytest.mark.slow
def test_demo_again_reuses_every_finished_stage(demo_run):
    out, _ = demo_run
    before = (out / "pretrain" / "summary.json").stat().st_mtime
    cmd = [sys.executable, "-m", "rlhfkit", "demo", "--preset", "fast", "--out", str(out), "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for stage in ("pretrain", "sft", "feedback", "rm", "ppo", "eval"):
        assert f"{stage}: reusing" in " ".join(result.stdout.split())
    assert (out / "pretrain" / "summary.json").stat().st_mtime == before


def test_changing_a_section_invalidates_that_stage_and_downstream(tmp_path):
    base = Run(tmp_path / "a", load_config())
    changed = Run(tmp_path / "b", load_config(overrides=["rm.lr=0.1"]))
    for stage in ("pretrain", "sft", "feedback"):
        assert base.fingerprint(stage) == changed.fingerprint(stage)
    for stage in ("rm", "ppo", "eval"):
        assert base.fingerprint(stage) != changed.fingerprint(stage)


def _fingerprints(out: Path, overrides: list[str]) -> dict[str, str]:
    run = Run(out, load_config(overrides=overrides))
    return {stage: run.fingerprint(stage) for stage in (*STAGES, *METHOD_STAGES)}


def test_editing_a_data_file_invalidates_the_stages_that_read_it_and_downstream(tmp_path):
    """A data file edited in place is new input: the stage reading it runs again, as after a change of
    its path, while the stages before it stay finished."""
    prefs = tmp_path / "prefs.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    row = {"prompt": "Top 5 board games?", "chosen": "1. Chess", "rejected": "1. Chess\n1. Chess"}
    write_jsonl(prefs, [row])
    write_jsonl(prompts, [{"prompt": "Top 5 board games?"}])
    overrides = [f"data.preferences={prefs}", f"data.prompts={prompts}"]
    before = _fingerprints(tmp_path / "run", overrides)
    write_jsonl(prefs, [row, {**row, "chosen": "1. Go"}])
    after_prefs = _fingerprints(tmp_path / "run", overrides)
    changed = {stage for stage in before if before[stage] != after_prefs[stage]}
    # kto derives its thumbs from the pairs when data.unpaired is unset.
    assert changed == {"rm", "ppo", "eval", "dpo", "kto", "grpo", "rloo", "bon", "expert_iter"}
    write_jsonl(prompts, [{"prompt": "Top 5 card games?"}])
    after_prompts = _fingerprints(tmp_path / "run", overrides)
    changed = {stage for stage in before if after_prefs[stage] != after_prompts[stage]}
    # The feedback stage samples the RL prompts; everything after it builds on its labels.
    assert changed == set(STAGES[2:]) | set(METHOD_STAGES)
    # Rewriting the same content is no change.
    write_jsonl(prompts, [{"prompt": "Top 5 card games?"}])
    assert _fingerprints(tmp_path / "run", overrides) == after_prompts


def test_pointing_a_data_key_at_another_file_invalidates_only_the_stages_that_read_it(tmp_path):
    """A data key set or pointed elsewhere is new input for the stages that read it, as an edit is:
    training an RM on another preference file keeps pretraining, SFT and feedback."""
    first, second = tmp_path / "prefs-1.jsonl", tmp_path / "prefs-2.jsonl"
    row = {"prompt": "Top 5 board games?", "chosen": "1. Chess", "rejected": "1. Chess\n1. Chess"}
    write_jsonl(first, [row])
    write_jsonl(second, [row, {**row, "chosen": "1. Go"}])
    unset = _fingerprints(tmp_path / "run", [])
    one = _fingerprints(tmp_path / "run", [f"data.preferences={first}"])
    two = _fingerprints(tmp_path / "run", [f"data.preferences={second}"])
    reads_pairs = {"rm", "ppo", "eval", "dpo", "kto", "grpo", "rloo", "bon", "expert_iter"}
    for a, b in ((unset, one), (one, two)):
        assert {stage for stage in a if a[stage] != b[stage]} == reads_pairs
    # The same content under another name is the same input.
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(first.read_bytes())
    assert _fingerprints(tmp_path / "run", [f"data.preferences={copy}"]) == one
    # The task is what pretraining reads: changing it changes every stage.
    other_task = _fingerprints(tmp_path / "run", ["data.task=colours_task"])
    assert all(unset[stage] != other_task[stage] for stage in unset)


def test_a_saved_dataset_folder_is_fingerprinted_by_its_files(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "demos"
    rows = {"prompt": ["Top 5 board games?"], "completion": ["1. Chess"]}
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(folder))
    overrides = [f"data.demonstrations={folder}:train"]
    before = _fingerprints(tmp_path / "run", overrides)
    rows["completion"] = ["1. Go"]
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(folder))
    after = _fingerprints(tmp_path / "run", overrides)
    assert before["pretrain"] == after["pretrain"] and before["sft"] != after["sft"]


def test_source_digest_of_each_kind_of_source(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text('{"prompt": "x"}\n')
    assert source_digest(data) == hashlib.sha256(data.read_bytes()).hexdigest()
    assert source_digest(tmp_path / "nowhere.jsonl") == "missing"
    # A hub id is taken as written; a local folder named through hf: by its files.
    assert source_digest("hf:owner/name:train") != source_digest("hf:owner/name:test")
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "x"}\n')
    first = source_digest(f"hf:{folder}:train")
    assert first == source_digest(folder) == source_digest(f"{folder}:train")
    (folder / "train.jsonl").write_text('{"prompt": "y"}\n')
    edited = source_digest(f"hf:{folder}:train")
    assert edited != first
    # A file's name inside a folder counts, not only the bytes.
    (folder / "train.jsonl").rename(folder / "test.jsonl")
    assert source_digest(folder) != edited
