"""Memory estimate against hand-computed numbers; bf16, gradient checkpointing and offload run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.config import load_config
from rlhfkit.models.loading import load_reward_model, save_model, tiny_causal_lm
from rlhfkit.models.memory import HeldModel, estimate_memory, format_estimate
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.train.ppo import decoder_blocks, run_ppo
from rlhfkit.train.sft import run_sft

POLICY = HeldModel("policy", 1000, 1000, hidden_size=8, num_layers=2, vocab_size=50, reads_vocab=True)
REFERENCE = HeldModel("reference", 1000, 0, hidden_size=8, num_layers=2, vocab_size=50, reads_vocab=True)
REWARD = HeldModel("reward model", 900, 0, hidden_size=8, num_layers=2, vocab_size=50, reads_vocab=False)


def test_estimate_by_hand():
    est = estimate_memory([POLICY, REFERENCE, REWARD], batch_tokens=10, dtype="float32")
    assert est.weights == 4 * (1000 + 1000 + 900)
    assert est.gradients == 4 * 1000
    assert est.optimizer == 8 * 1000
    # Only the trained policy keeps activations: 10 tokens * 8 hidden * 4 bytes * 2 layers * 17.
    assert est.activations == 10 * 8 * 4 * 2 * 17 == 10880
    # Policy and reference logits: 8 bytes * 10 tokens * 50 vocab each.
    assert est.logits == 2 * 8 * 10 * 50
    assert est.total == 11600 + 4000 + 8000 + 10880 + 8000


def test_bf16_checkpointing_and_offload_shrink_the_estimate():
    est = estimate_memory([POLICY], 10, dtype="bfloat16", gradient_checkpointing=True)
    # 2-byte activations; per layer input kept (2 layers) plus one layer recomputed (17).
    assert est.activations == 10 * 8 * 2 * (2 + 17) == 3040
    offloaded = HeldModel("reference", 1000, 0, 8, 2, 50, reads_vocab=True, on_device=False)
    assert estimate_memory([offloaded], 10).total == 0
    text = format_estimate([POLICY, offloaded], est)
    assert "offloaded to CPU" in text and "total:" in text


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    texts = ["Say a colour number 3. red", "blue green red yellow"] * 40
    tokenizer = train_tokenizer(texts, vocab_size=300)
    save_model(
        tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        tokenizer,
        root / "sft",
    )
    save_model(load_reward_model(root / "sft", tokenizer.pad_token_id), tokenizer, root / "rm")
    return root


def test_bf16_gradient_checkpointing_offload_and_micro_batched_generation_run(
    folders, tmp_path, capsys, monkeypatch
):
    import transformers.modeling_utils

    import rlhfkit.train.ppo as ppo

    # The blocks run under activation checkpointing (transformers looks its checkpoint function up
    # there when a model turns checkpointing on), and the models PPO loads as reward model and critic.
    checkpointed, loaded = [], []
    checkpoint, load = transformers.modeling_utils.checkpoint, ppo.load_reward_model

    def recorded_checkpoint(forward, *args, **kwargs):
        checkpointed.append(forward.args[0])  # forward: the block's forward bound to the block
        return checkpoint(forward, *args, **kwargs)

    def recorded_load(*args, **kwargs):
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", recorded_checkpoint)
    monkeypatch.setattr(ppo, "load_reward_model", recorded_load)
    config = load_config(
        overrides=[
            "model.dtype=bfloat16",
            "model.gradient_checkpointing=true",
            "model.offload_reference=true",
            "rollout.batch_size=2",
            "sft.batch_size=4",
            "sft.epochs=0.5",
            "ppo.steps=1",
            "ppo.rollout_batch=4",
            "ppo.minibatch=2",
            "ppo.ppo_epochs=1",
            "ppo.max_new_tokens=5",
            "ppo.reward_norm_samples=4",
        ]
    )
    prompts = [f"Say a colour number {i}." for i in range(4)]
    summary = run_sft(
        config, folders / "sft", [{"prompt": p, "completion": "red"} for p in prompts], tmp_path
    )
    assert summary["final_loss"] > 0
    out = capsys.readouterr().out
    assert "memory estimate" in out and "policy" in out
    ppo = run_ppo(config, folders / "sft", folders / "rm", prompts, tmp_path / "ppo")
    assert ppo["steps"] == 1
    out = capsys.readouterr().out
    assert "reference" in out and "offloaded to CPU" in out and "critic" in out
    # The separate critic is trained, so checkpointed as the policy is (it was left in eval mode,
    # where transformers does not checkpoint), while the memory estimate counted it checkpointed.
    reward_model, critic = loaded
    blocks = {id(block) for block in checkpointed}  # kept alive in the list: no id reused
    assert all(id(block) in blocks for block in decoder_blocks(critic))
    assert not any(id(block) in blocks for block in decoder_blocks(reward_model))  # frozen
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "model")
    # Mixed precision computes in bf16 but keeps (and saves) float32 weights.
    assert next(model.parameters()).dtype == torch.float32
