"""A user's own task module and data files, on a local Hugging Face model, through the stages."""

import json
import subprocess
import sys
import textwrap

import pytest

from rlhfkit.models.loading import save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer

TASK_MODULE = textwrap.dedent(
    """
    from rlhfkit.tasks import Task

    def build(seed):
        prompts = [f"Say a colour number {i}." for i in range(12)]
        demos = [{"prompt": p, "completion": "red"} for p in prompts]
        return Task(name="colours", train_prompts=prompts, heldout_prompts=prompts[:4],
                    demonstrations=demos)
    """
)


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A random-init Llama saved to a folder, standing in for a hub checkpoint."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-llama"
    texts = ["Say a colour number 3. red", "blue green red yellow", "a colour is red or blue"] * 50
    tokenizer = train_tokenizer(texts, vocab_size=300)
    save_model(
        tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        tokenizer,
        folder,
    )
    return folder


def _rlhfkit(*args, cwd, env_path):
    env = {"PYTHONPATH": str(env_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "rlhfkit", *args, "--no-progress"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_own_task_module_and_preference_file(tmp_path, local_model):
    (tmp_path / "colours_task.py").write_text(TASK_MODULE)
    prefs = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": f"Say a colour number {i}.", "chosen": "red", "rejected": "blue green"} for i in range(12)
    ]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "--out",
        str(tmp_path / "run"),
        "--set",
        "data.task=colours_task",
        "--set",
        f"model.name_or_path={local_model}",
    ]
    small = [
        "--set",
        "ppo.steps=2",
        "--set",
        "ppo.rollout_batch=4",
        "--set",
        "ppo.minibatch=2",
        "--set",
        "ppo.max_new_tokens=4",
        "--set",
        "rm.val_share=0",
    ]
    sft = _rlhfkit("sft", *common, cwd=tmp_path, env_path=tmp_path)
    assert sft.returncode == 0, sft.stderr
    assert "n_demonstrations=12" in " ".join(sft.stdout.split())
    rm = _rlhfkit(
        "rm", *common, "--set", f"data.preferences={prefs}", *small, cwd=tmp_path, env_path=tmp_path
    )
    assert rm.returncode == 0, rm.stderr
    assert "n_train_pairs=12" in " ".join(rm.stdout.split())
    ppo = _rlhfkit(
        "ppo", *common, "--set", f"data.preferences={prefs}", *small, cwd=tmp_path, env_path=tmp_path
    )
    assert ppo.returncode == 0, ppo.stderr
    metrics = [
        json.loads(line) for line in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(metrics) == 2 and all("kl" in m and "reward/score" in m for m in metrics)
