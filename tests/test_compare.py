"""`rlhfkit compare` and the method stages' place in the pipeline (fingerprints, CLI errors)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.compare import ALGOS, parse_algos
from rlhfkit.config import load_config
from rlhfkit.pipeline import METHOD_STAGES, STAGES, Run

# Every stage a few steps on a tiny model: the point is the wiring, not the numbers.
TINY_YAML = """
model: {vocab_size: 400, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64,
        max_positions: 128}
pretrain: {steps: 30, batch_size: 4, block_size: 64}
sft: {epochs: 0.2, batch_size: 8, max_length: 64}
feedback: {n_prompts: 40, max_new_tokens: 16, overlap_share: 0.2}
rm: {epochs: 1, batch_size: 8, max_length: 64}
ppo: {steps: 2, rollout_batch: 8, minibatch: 8, max_new_tokens: 16}
eval: {n_prompts: 12, max_new_tokens: 16, heldout_pairs: 0, n_samples: 2}
dpo: {epochs: 0.5, batch_size: 4, max_length: 64}
kto: {epochs: 0.3, batch_size: 4, max_length: 64}
grpo: {steps: 2, prompts_per_step: 2, group_size: 3, minibatch: 6, max_new_tokens: 16}
rloo: {steps: 2, prompts_per_step: 2, group_size: 3, minibatch: 6, max_new_tokens: 16}
bon: {n: 3}
expert_iter: {rounds: 1, n: 2, n_prompts: 8, max_new_tokens: 16, batch_size: 4}
"""


def test_parse_algos_puts_sft_first_and_rejects_unknown_names():
    assert parse_algos("dpo, grpo,dpo") == ["sft", "dpo", "grpo"]
    assert parse_algos(",".join(ALGOS)) == list(ALGOS)
    with pytest.raises(ValueError, match="unknown method.*dpoo"):
        parse_algos("sft,dpoo")


def test_compare_cli_error_names_the_bad_method(tmp_path):
    result = CliRunner().invoke(app, ["compare", "--algos", "sft,ppo2", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "ppo2" in result.output and "choose from" in result.output


def test_method_stages_are_not_in_the_demo_and_every_one_has_a_command():
    assert not set(METHOD_STAGES) & set(STAGES)
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert set(METHOD_STAGES) | {"compare"} <= commands


def test_method_fingerprints_follow_their_own_section_and_upstream(tmp_path):
    base = Run(tmp_path / "a", load_config())
    dpo_changed = Run(tmp_path / "b", load_config(overrides=["dpo.beta=0.5"]))
    rm_changed = Run(tmp_path / "c", load_config(overrides=["rm.lr=0.1"]))
    # A DPO setting re-runs DPO only.
    assert base.fingerprint("dpo") != dpo_changed.fingerprint("dpo")
    for stage in ("rm", "ppo", "kto", "grpo", "rloo", "bon", "expert_iter", "eval"):
        assert base.fingerprint(stage) == dpo_changed.fingerprint(stage)
    # A new reward model re-runs the methods that use it, not DPO/KTO (which read the pairs).
    for stage in ("grpo", "rloo", "bon", "expert_iter"):
        assert base.fingerprint(stage) != rm_changed.fingerprint(stage)
    for stage in ("dpo", "kto"):
        assert base.fingerprint(stage) == rm_changed.fingerprint(stage)
    # Best-of-n is judged with the eval settings, so they are part of its fingerprint.
    assert base.fingerprint("bon") != Run(
        tmp_path / "d", load_config(overrides=["eval.n_prompts=7"])
    ).fingerprint("bon")


@pytest.mark.slow
def test_method_stage_without_upstream_says_what_to_run(tmp_path):
    result = CliRunner().invoke(app, ["dpo", "--out", str(tmp_path / "empty"), "--no-progress"])
    assert result.exit_code == 2
    assert "rlhfkit" in result.output and ("feedback" in result.output or "sft" in result.output)


@pytest.mark.slow
def test_compare_end_to_end_on_a_tiny_config(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "rlhfkit",
        "compare",
        "--config",
        str(config),
        "--out",
        str(out),
        "--no-progress",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert report["algos"] == list(ALGOS) and report["judge"] == "gold" and report["n_prompts"] == 12
    for name in ALGOS:
        row = report["policies"][name]
        assert math.isfinite(row["gold_reward"]) and math.isfinite(row["kl_from_sft"])
        assert row["wall_seconds"] is not None
        if name != "sft":
            win = row["win_rate_vs_sft"]
            assert win["n"] == 12 and win["ci95"][0] <= win["rate"] <= win["ci95"][1]
        if name not in ("sft", "bon"):
            assert (out / name / "model" / "config.json").is_file()
            assert (out / name / "metrics.jsonl").stat().st_size > 0
    assert report["policies"]["bon"]["kl_from_sft"] == pytest.approx(math.log(3) - 2 / 3, abs=1e-4)
    # Best-of-n's draw 0 is the SFT sample the eval judged: the same gold reward.
    assert report["stages"]["bon"]["gold_reward_single"] == pytest.approx(
        report["policies"]["sft"]["gold_reward"]
    )
    assert (out / "bon" / "samples.jsonl").is_file() and (out / "bon" / "policy.json").is_file()
    assert "Methods vs SFT" in result.stdout
    # A second run reuses every finished stage.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage in ("sft", "rm", "dpo", "grpo", "bon"):
        assert f"{stage}: reusing" in " ".join(again.stdout.split())


def test_lora_and_rollout_settings_are_part_of_the_stages_that_use_them(tmp_path):
    base = Run(tmp_path / "a", load_config())
    lora = Run(tmp_path / "b", load_config(overrides=["lora.enabled=true"]))
    # LoRA changes what SFT trains, hence everything after it; pretraining is full-weight.
    assert base.fingerprint("pretrain") == lora.fingerprint("pretrain")
    for stage in ("sft", "feedback", "rm", "ppo", "eval", "dpo", "kto", "grpo", "rloo", "bon", "expert_iter"):
        assert base.fingerprint(stage) != lora.fingerprint(stage), stage
    # How rollouts are sampled is part of the stages that sample them, not of SFT, RM or DPO.
    rollout = Run(tmp_path / "c", load_config(overrides=["rollout.forward_batch_size=4"]))
    for stage in ("ppo", "grpo", "rloo", "bon", "expert_iter"):
        assert base.fingerprint(stage) != rollout.fingerprint(stage), stage
    for stage in ("sft", "feedback", "rm", "dpo", "kto"):
        assert base.fingerprint(stage) == rollout.fingerprint(stage), stage


def test_an_interrupted_compare_says_how_to_continue_and_resumes_its_stages(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM in `compare` ends as in the demo: the checkpoint named, exit 130, and the
    same command continues the interrupted stage from its checkpoint (a traceback and exit 1, and a
    restart from step 0, before)."""
    import rlhfkit.compare as compare
    from rlhfkit.train.checkpoint import TrainingInterrupted

    runs = []

    def interrupted(run, names):
        runs.append(run)
        raise TrainingInterrupted("dpo", 7, tmp_path / "run" / "dpo" / "checkpoints" / "step-7")

    monkeypatch.setattr(compare, "run_compare", interrupted)
    result = CliRunner().invoke(app, ["compare", "--algos", "dpo", "--out", str(tmp_path / "run")])
    assert result.exit_code == 130, result.output
    flat = " ".join(result.output.split())
    assert (
        "dpo interrupted at step 7" in flat
        and f"continue with: rlhfkit compare --algos dpo --out {tmp_path / 'run'}" in flat
    )
    assert "Traceback" not in result.output
    (run,) = runs
    assert run.resume and run.restart_changed  # as `rlhfkit demo`: resume, or start over if changed
