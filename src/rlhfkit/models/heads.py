"""Per-token and per-sequence scalar outputs of sequence-classification models.

A reward model and a PPO critic are both `*ForSequenceClassification` models with
one label; the reward is read at the last valid token, the value at every token.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rlhfkit.rollout.batch import SharedPrefixPairs
from rlhfkit.rollout.logprobs import position_ids_from_mask


def token_values(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar head applied at every position: [batch, seq].

    `attention_mask` is a [batch, seq] padding mask (positions counted from it), or a ready-made
    [batch, 1, seq, seq] mask with its `position_ids` (`SharedPrefixPairs`)."""
    # A LoRA (peft) model: its adapters live inside the base model's layers, so read those.
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask) if position_ids is None else position_ids,
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

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return token_values(self.model, input_ids, attention_mask, position_ids)


def values_of(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token values of a transformers/peft model, or of a TokenValues (possibly wrapped by DDP)."""
    if hasattr(model, "base_model_prefix"):
        return token_values(model, input_ids, attention_mask, position_ids)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def inner_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside peft, DDP/DeepSpeed (`.module`) and TokenValues wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(model, TokenValues):
            model = model.model
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def takes_pair_masks(model: torch.nn.Module) -> bool:
    """Whether the model's attention applies a ready-made [batch, 1, seq, seq] mask as given, which
    `pair_scores` needs: transformers' "sdpa" and "eager" do; flash-attention kernels do not."""
    config = getattr(inner_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


def pair_scores(model: torch.nn.Module, pairs: SharedPrefixPairs, device: torch.device) -> torch.Tensor:
    """[batch, 2]: the scalar at the last token of each pair's a and b, in one forward over rows
    that hold each pair's shared prefix once. Equal to `sequence_scores` of a and of b (the same
    function; the sums run in another order) when `takes_pair_masks(model)`."""
    inner = inner_model(model)
    mask = pairs.attention_mask(inner.config._attn_implementation, inner.dtype)
    values = values_of(
        model, pairs.input_ids.to(device), mask.to(device), position_ids=pairs.position_ids.to(device)
    )
    return values.gather(1, pairs.last.to(device))


def sequence_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The scalar at the last valid token of each row: the reward of the whole sequence."""
    values = values_of(model, input_ids, attention_mask)
    # Position of the last 1 in the mask, whether padding is on the left or the right.
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)
