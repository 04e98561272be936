"""LoRA through peft: one base copy (reference = adapter off), merged saves, every stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import rlhfkit.models.loading as loading_module
import rlhfkit.train.checkpoint as checkpoint_module
import rlhfkit.train.distributed as distributed_module
import rlhfkit.train.kto as kto_module
from rlhfkit.config import ConfigError, load_config
from rlhfkit.models.loading import ADAPTER_DIR, load_causal_lm, load_reward_model, save_model, tiny_causal_lm
from rlhfkit.models.lora import adapter_disabled, apply_lora, count_parameters, merged_copy, reference_of
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.rollout.logprobs import response_logprobs
from rlhfkit.train.dpo import run_dpo
from rlhfkit.train.grpo import run_critic_free
from rlhfkit.train.kto import run_kto
from rlhfkit.train.ppo import run_ppo
from rlhfkit.train.rewards import build_reward_functions
from rlhfkit.train.rm import run_rm
from rlhfkit.train.sft import run_sft

TEXTS = ["Say a colour number 3. red", "blue green red yellow", "a colour is red or blue"] * 40
PROMPTS = [f"Say a colour number {i}." for i in range(8)]
PAIRS = [{"prompt": p, "chosen": "red", "rejected": "blue green"} for p in PROMPTS]
THUMBS = [
    {"prompt": p, "completion": ("red " if i % 2 else "blue ") * (i % 3 + 1), "label": i % 2 == 1}
    for i, p in enumerate(PROMPTS)
]
LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8"]


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora") / "sft"
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    save_model(model, tokenizer, folder)
    return folder


def _lora_model(folder: Path):
    config = load_config(overrides=LORA)
    model = apply_lora(load_causal_lm(folder), config.lora)
    # peft starts B at zero (the adapter is a no-op); give it weights so the test can tell.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_adapter_off_is_the_base_model_and_merge_is_exact(sft_folder, tmp_path):
    base = load_causal_lm(sft_folder).eval()
    model = _lora_model(sft_folder).eval()
    ids = torch.tensor([[5, 9, 12, 7, 30, 31]])
    mask = torch.ones_like(ids)
    base_logp = response_logprobs(base, ids, mask, 3)
    with reference_of(model) as ref:
        assert torch.allclose(response_logprobs(ref, ids, mask, 3), base_logp, atol=1e-6)
    adapted = response_logprobs(model, ids, mask, 3)
    assert not torch.allclose(adapted, base_logp, atol=1e-3)
    # Merging copies: the LoRA model keeps training, the merged one is plain transformers.
    merged = merged_copy(model)
    assert not isinstance(merged, PeftModel) and isinstance(model, PeftModel)
    assert torch.allclose(response_logprobs(merged, ids, mask, 3), adapted, atol=1e-5)
    with adapter_disabled(model):
        assert torch.allclose(response_logprobs(model, ids, mask, 3), base_logp, atol=1e-6)


def test_only_adapters_train(sft_folder):
    model = _lora_model(sft_folder)
    total, trainable = count_parameters(model)
    base_total, _ = count_parameters(load_causal_lm(sft_folder))
    # r=4 on every linear layer of 2 blocks (q k v o gate up down): (in + out) * r each.
    per_block = 4 * (4 * (32 + 32) + 2 * (32 + 64) + (64 + 32))
    assert trainable == 2 * per_block
    assert total == base_total + trainable


def test_bad_target_modules_name_the_key(sft_folder):
    config = load_config(overrides=[*LORA, "lora.target_modules=[no_such_proj]"])
    with pytest.raises(ValueError, match="lora.target_modules"):
        apply_lora(load_causal_lm(sft_folder), config.lora)
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(overrides=["lora.r=0"])


def _saved_merged_and_adapter(folder: Path, cls) -> None:
    model = cls.from_pretrained(folder)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert (folder / ADAPTER_DIR / "adapter_config.json").is_file()
    assert (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_every_stage_trains_lora_and_saves_merged(sft_folder, tmp_path, monkeypatch):
    small = LORA + [
        "sft.batch_size=4",
        "sft.epochs=0.5",
        "rm.batch_size=4",
        "rm.epochs=0.5",
        "rm.val_share=0",
        "ppo.steps=1",
        "ppo.rollout_batch=4",
        "ppo.minibatch=2",
        "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=5",
        "ppo.reward_norm_samples=4",
        "dpo.batch_size=4",
        "dpo.epochs=0.5",
        "dpo.precompute_reference=false",
        "grpo.steps=1",
        "grpo.prompts_per_step=2",
        "grpo.group_size=2",
        "grpo.minibatch=4",
        "grpo.max_new_tokens=5",
    ]
    config = load_config(overrides=small)
    run_sft(
        config, sft_folder, [{"prompt": p, "completion": "red"} for p in PROMPTS], tmp_path / "sft", False
    )
    _saved_merged_and_adapter(tmp_path / "sft" / "model", AutoModelForCausalLM)
    run_rm(config, sft_folder, PAIRS, tmp_path / "rm", False)
    _saved_merged_and_adapter(tmp_path / "rm" / "model", AutoModelForSequenceClassification)
    # The reward head trained (peft keeps it fully trainable): the merged head differs from a fresh one.
    fresh = load_reward_model(sft_folder, 0)
    trained = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert not torch.equal(fresh.score.weight, trained.score.weight)

    # PPO and DPO hold one causal-LM base: no reference model is ever loaded.
    loads: list[str] = []
    real_load = load_causal_lm

    def counting_load(path, quantization=None):
        loads.append(str(path))
        return real_load(path, quantization)

    # The trained policy loads through load_trainable (models.loading), a reference through
    # train.distributed.load_reference.
    monkeypatch.setattr(loading_module, "load_causal_lm", counting_load)
    monkeypatch.setattr(distributed_module, "load_causal_lm", counting_load)
    run_ppo(config, sft_folder, tmp_path / "rm" / "model", PROMPTS, tmp_path / "ppo", False)
    assert loads == [str(sft_folder)]
    _saved_merged_and_adapter(tmp_path / "ppo" / "model", AutoModelForCausalLM)
    _saved_merged_and_adapter(tmp_path / "ppo" / "checkpoints" / "step-1", AutoModelForCausalLM)
    loads.clear()
    run_dpo(config, sft_folder, PAIRS, tmp_path / "dpo", False)
    assert loads == [str(sft_folder)]
    _saved_merged_and_adapter(tmp_path / "dpo" / "model", AutoModelForCausalLM)

    terms = build_reward_functions(config.grpo.rewards, tmp_path / "rm" / "model")
    run_critic_free(config, "grpo", sft_folder, terms, PROMPTS, tmp_path / "grpo", False)
    _saved_merged_and_adapter(tmp_path / "grpo" / "model", AutoModelForCausalLM)
    # The policy moved away from its base.
    before = AutoModelForCausalLM.from_pretrained(sft_folder).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_kto_trains_lora_with_the_adapter_off_policy_as_reference(sft_folder, tmp_path, monkeypatch):
    kto = ["kto.batch_size=4", "kto.epochs=2", "kto.lr=2e-2", "kto.warmup_ratio=0"]
    loads: list[str] = []
    real_load = load_causal_lm

    def counting_load(path, quantization=None):
        loads.append(str(path))
        return real_load(path, quantization)

    trained, references = [], []
    real_trainable = checkpoint_module.load_trainable  # every stage loads its trained model there

    def recording_trainable(path, config, *args):
        trained.append(real_trainable(path, config, *args))
        return trained[-1]

    def recording_reference_of(model):
        references.append(model)
        return reference_of(model)

    monkeypatch.setattr(loading_module, "load_causal_lm", counting_load)
    monkeypatch.setattr(distributed_module, "load_causal_lm", counting_load)
    monkeypatch.setattr(checkpoint_module, "load_trainable", recording_trainable)
    monkeypatch.setattr(kto_module, "reference_of", recording_reference_of)
    run_kto(load_config(overrides=kto), sft_folder, THUMBS, tmp_path / "full", False)
    # Full weights: the policy and a second copy as the reference.
    assert loads == [str(sft_folder)] * 2 and references[0] is not trained[0]
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]

    before = AutoModelForCausalLM.from_pretrained(sft_folder).state_dict()
    curves = {}
    for precompute in ("true", "false"):
        loads.clear()
        trained.clear()
        references.clear()
        out = tmp_path / f"lora-precompute-{precompute}"
        config = load_config(overrides=[*LORA, *kto, f"kto.precompute_reference={precompute}"])
        run_kto(config, sft_folder, THUMBS, out, False)
        # One base: the trained policy is the only model loaded, and with its adapter off the reference.
        assert loads == [str(sft_folder)]
        (policy,) = trained
        assert references and all(ref is policy for ref in references)
        # Only the adapters trained: every other weight is still the SFT model's.
        names = [name for name, p in policy.named_parameters() if p.requires_grad]
        assert names and all("lora_" in name for name in names)
        for name, p in policy.named_parameters():
            if "lora_" not in name:
                key = name.removeprefix("base_model.model.").replace(".base_layer", "")
                assert torch.equal(p.detach(), before[key]), name
        assert any("lora_B" in name and p.abs().max() > 0 for name, p in policy.named_parameters())
        _saved_merged_and_adapter(out / "model", AutoModelForCausalLM)
        after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
        curves[precompute] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    lora = curves["true"]
    # Step 1: B = 0, so the policy is its reference and every statistic is the full-weight run's
    # (r = 0, z0 = 0, loss 0.5; measured equal, checked to 1e-6).
    assert lora[0] == pytest.approx(full[0], abs=1e-6) and lora[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    # The live reference (adapter off each batch) stays the base while the adapter trains: it gives
    # the precomputed run's numbers at every step (measured equal, checked to 1e-6).
    assert len(lora) == 4 and all(
        live == pytest.approx(pre, abs=1e-6) for live, pre in zip(curves["false"], lora, strict=True)
    )
    assert lora[-1]["loss"] < lora[0]["loss"]
    assert lora[-1]["reward/desirable"] > lora[-1]["reward/undesirable"]
