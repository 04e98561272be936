"""Load and save Hugging Face models: causal LMs, reward models, critics, tiny configs."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhfkit.models.tokenizer import ensure_pad_token


def tiny_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    arch: str = "llama",
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 384,
    max_positions: int = 256,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised Llama- or Qwen2-style causal LM sized for a CPU."""
    model_type = {"llama": "llama", "qwen2": "qwen2"}.get(arch)
    if model_type is None:
        raise ValueError(f"model.arch must be 'llama' or 'qwen2', got {arch!r}")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a hub id or local folder, with a pad token guaranteed."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ensure_pad_token(tokenizer)
    return tokenizer


def load_causal_lm(path: str | Path) -> PreTrainedModel:
    """A causal LM from a hub id or a local folder (any architecture transformers knows)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model


def load_reward_model(path: str | Path, pad_token_id: int) -> PreTrainedModel:
    """A sequence-classification model with one output: the reward.

    Loading a causal-LM checkpoint here keeps its transformer and adds a fresh scalar
    head, which is how a reward model starts from the SFT model.
    """
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    # The classifier reads the last non-pad token, so it must know which id is padding.
    model.config.pad_token_id = pad_token_id
    return model


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """save_pretrained for the model and its tokenizer, into one folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
