"""Per-token and per-sequence scalar outputs of sequence-classification models.

A reward model and a PPO critic are both `*ForSequenceClassification` models with
one label; the reward is read at the last valid token, the value at every token.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rlhfkit.rollout.logprobs import position_ids_from_mask


def token_values(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The scalar head applied at every position: [batch, seq]."""
    # A LoRA (peft) model: its adapters live inside the base model's layers, so read those.
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


class TokenValues(torch.nn.Module):
    """A reward/value model whose forward is `token_values`.

    DDP, FSDP and DeepSpeed synchronise gradients through the wrapped module's forward, so a
    trained reward model or critic is prepared in this wrapper, not called around it.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self) -> list[str] | None:
        # Read by accelerate's FSDP auto-wrap policy: shard each transformer block as its own unit.
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_values(self.model, input_ids, attention_mask)


def values_of(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token values of a transformers/peft model, or of a TokenValues (possibly wrapped by DDP)."""
    if hasattr(model, "base_model_prefix"):
        return token_values(model, input_ids, attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask)


def sequence_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The scalar at the last valid token of each row: the reward of the whole sequence."""
    values = values_of(model, input_ids, attention_mask)
    # Position of the last 1 in the mask, whether padding is on the left or the right.
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)
