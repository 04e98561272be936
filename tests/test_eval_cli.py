"""`rlhfkit eval --policies --judge` and `rlhfkit overopt` on a run directory of tiny models."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.models.loading import save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.tasks import load_task

# Tiny models, but several of them sample and score: about a minute on 2 busy cores.
pytestmark = pytest.mark.slow

SMALL = [
    "--set", "eval.n_prompts=4", "--set", "eval.heldout_pairs=6", "--set", "eval.max_new_tokens=8",
    "--set", "eval.n_samples=2", "--set", "overopt.n_prompts=3", "--set", "overopt.samples_per_prompt=8",
    "--set", "overopt.max_new_tokens=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """sft/, rm/ and two PPO checkpoints: tiny random models (no training), enough to drive the commands."""
    run = tmp_path_factory.mktemp("run")
    task = load_task("top5", 0)
    tokenizer = train_tokenizer(task.corpus[:300] + [d["completion"] for d in task.demonstrations], 300)
    for folder, seed in (
        ("sft/model", 0),
        ("rm/model", 1),
        ("ppo/checkpoints/step-2", 2),
        ("ppo/checkpoints/step-4", 3),
    ):
        model = tiny_causal_lm(
            tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=seed
        )
        if folder.startswith("ppo"):
            # A checkpoint is the SFT model moved a little, as training would.
            sft = tiny_causal_lm(
                tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0
            )
            with torch.no_grad():
                for p, q in zip(model.parameters(), sft.parameters(), strict=True):
                    p.copy_(q + 0.05 * seed * torch.randn_like(q))
        save_model(model, tokenizer, run / folder)
    return run


def test_eval_policies_judge_rm(tiny_run):
    ckpt = tiny_run / "ppo/checkpoints/step-4"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--out",
            str(tiny_run),
            "--policies",
            f"sft,{ckpt}",
            "--judge",
            "rm",
            "--ci",
            "bootstrap",
            *SMALL,
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tiny_run / "report.json").read_text())
    ev = report["eval"]
    assert ev["judge"] == "rm" and ev["reference"] == "sft"
    assert ev["judge_model"] == str(tiny_run / "rm" / "model")  # which reward model judged
    assert set(ev["policies"]) == {"sft", "checkpoints/step-4"}
    win = ev["win_rate_vs_sft"]["checkpoints/step-4"]
    assert (
        win["n"] == 4
        and win["ci_method"] == "bootstrap"
        and 0 <= win["ci95"][0] <= win["rate"] <= win["ci95"][1]
    )
    for metrics in ev["policies"].values():
        assert {"distinct_1", "distinct_2", "length_words", "gold_reward", "proxy_reward"} <= set(metrics)
    bench = report["rm"]["bench"]
    assert bench["n_pairs"] + bench["n_gold_ties_dropped"] == 6 and "calibration" in bench
    html = (tiny_run / "report.html").read_text()
    assert "judged by the <b>rm</b> judge" in html and "Benchmark on gold-labelled held-out pairs" in html


def test_eval_rejects_an_unknown_policy(tiny_run):
    result = CliRunner().invoke(app, ["eval", "--out", str(tiny_run), "--policies", "sft,nope", *SMALL])
    assert result.exit_code == 2
    assert "policy 'nope'" in result.output


def test_eval_rejects_an_unknown_judge(tiny_run):
    result = CliRunner().invoke(app, ["eval", "--out", str(tiny_run), "--judge", "oracle", *SMALL])
    assert result.exit_code == 2
    assert "eval.judge" in result.output


def test_overopt_sweeps_best_of_n_and_checkpoints(tiny_run):
    result = CliRunner().invoke(app, ["overopt", "--out", str(tiny_run), "--no-progress", *SMALL])
    assert result.exit_code == 0, result.output
    out = json.loads((tiny_run / "overopt" / "overopt.json").read_text())
    assert out["bon"]["n"] == [1, 2, 3, 4, 6, 8] and out["bon"]["samples_per_prompt"] == 8
    # Named as `eval --policies` names the folders (folder_labels).
    assert out["rl"]["checkpoints"] == ["sft", "checkpoints/step-2", "checkpoints/step-4"]
    assert out["rl"]["kl"][0] == 0.0 and "fit_gold" in out["rl"]
    assert (tiny_run / "overopt" / "overopt.png").stat().st_size > 1000
    assert "bon [rm]: gold peaks at" in result.output and "fit gold a=" in result.output
    report = json.loads((tiny_run / "report.json").read_text())
    assert "overopt" in report and "Reward over-optimisation" in (tiny_run / "report.html").read_text()


def test_overopt_names_a_missing_reward_model(tiny_run, tmp_path):
    result = CliRunner().invoke(app, ["overopt", "--out", str(tiny_run), "--rm", str(tmp_path), *SMALL])
    assert result.exit_code == 2
    assert "no saved model" in result.output


def _copy_of(run: Path, tmp_path: Path) -> Path:
    """The tiny run in a folder of its own: these commands record their config in the run."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_overopt_sweeps_the_configured_heldout_prompts(tiny_run, tmp_path):
    # data.heldout_prompts holds the prompts for evaluation: eval reads it, overopt must too.
    run = _copy_of(tiny_run, tmp_path)
    prompts = tmp_path / "heldout.jsonl"
    texts = ["Top 5 board games for families?", "Name five houseplants for beginners."]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    args = ["overopt", "--out", str(run), "--no-progress", *SMALL]
    result = CliRunner().invoke(app, [*args, "--set", f"data.heldout_prompts={prompts}"])
    assert result.exit_code == 0, result.output
    out = json.loads((run / "overopt" / "overopt.json").read_text())
    assert out["bon"]["n_prompts"] == 2


def test_overopt_keeps_checkpoints_whose_folders_share_a_name(tiny_run, tmp_path):
    # Two runs' step-2 (or two final ppo/model folders): neither may silently replace the other.
    run = _copy_of(tiny_run, tmp_path)
    other = Path(shutil.copytree(run / "ppo/checkpoints/step-4", tmp_path / "other" / "step-2"))
    mine = run / "ppo/checkpoints/step-2"
    args = ["overopt", "--out", str(run), "--no-progress", *SMALL]
    result = CliRunner().invoke(app, [*args, "--checkpoint", str(mine), "--checkpoint", str(other)])
    assert result.exit_code == 0, result.output
    out = json.loads((run / "overopt" / "overopt.json").read_text())
    assert len(out["rl"]["checkpoints"]) == 3 and out["rl"]["checkpoints"][0] == "sft"
    assert len(set(out["rl"]["kl"][1:])) == 2  # two different policies, two different KLs


def test_eval_reference_may_be_given_as_the_folder_named_in_policies(tiny_run, tmp_path):
    # Policies are labelled by model_label: --reference with the folder as given in --policies
    # was refused as "not among the policies". It is that policy.
    run = _copy_of(tiny_run, tmp_path)
    ckpt = run / "ppo/checkpoints/step-4"
    args = ["eval", "--out", str(run), "--policies", f"sft,{ckpt}", "--reference", str(ckpt), "--judge", "rm"]
    result = CliRunner().invoke(app, [*args, *SMALL, "--set", "eval.heldout_pairs=0", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    ev = report["eval"]
    assert ev["reference"] == "checkpoints/step-4"
    assert set(ev["win_rate_vs_checkpoints/step-4"]) == {"sft"}
    # No held-out pairs asked for: the contract's key is there, null, with the reason; nothing of
    # the earlier eval's benchmark is left beside it.
    rm = report["rm"]
    assert rm["heldout_accuracy"] is None
    assert rm["heldout_accuracy_reason"] == "eval.heldout_pairs is 0"
    assert "bench" not in rm and "n_heldout_pairs" not in rm
