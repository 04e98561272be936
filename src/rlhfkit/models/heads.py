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
        # No KV cache: nothing decodes after a scoring forward, and building one costs a copy of
        # every block's keys and values (about 4% of a reward-model step on the bench model).
        use_cache=False,
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
    if position_ids is None:  # a module taking only these two (a TokenValues takes positions too)
        return model(input_ids=input_ids, attention_mask=attention_mask)
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


def last_block_mlp(model: torch.nn.Module) -> torch.nn.Module | None:
    """The `mlp` of the model's last transformer block (the block class its `_no_split_modules`
    names, as FSDP wraps it), or None where there is none to find."""
    inner = inner_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or [])
    blocks = [m for m in inner.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    mlp = getattr(blocks[-1], "mlp", None) if blocks else None
    return mlp if isinstance(mlp, torch.nn.Module) else None


class ReadPositions:
    """The last block's MLP computed only at the positions scores are read from.

    A reward is read at one token of each sequence, and the last transformer block's MLP (applied
    to each position alone, most of a block's arithmetic) feeds nothing but the output at its own
    position. While `at` holds (rows, columns, (batch, width)), hooks on that MLP run it at those
    positions only and add nothing elsewhere: the model's output is exact at those positions and
    wrong at every other, so only scores read there may be used (`pair_scores` sets `at` and reads
    only there). `at` stays set until the next call, so a backward that recomputes the block
    (gradient checkpointing) sees the same positions; a forward of another batch or width runs the
    MLP whole. A context manager: the hooks leave with it. A model whose last block has no
    `mlp` is left whole (`active` is False). On a model of L blocks this saves about 1/L of the MLPs'
    work: 1/4 of them on the 4-block bench model, 1/24 on a 0.5B Qwen2."""

    def __init__(self, model: torch.nn.Module):
        self.mlp = last_block_mlp(model)
        self.at: tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None = None
        self._hooks: list = []
        self._gathered = False

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def __enter__(self) -> ReadPositions:
        if self.mlp is not None:
            self._hooks = [
                self.mlp.register_forward_pre_hook(self._gather),
                self.mlp.register_forward_hook(self._scatter),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.at = [], None

    def _gather(self, module, args):
        self._gathered = self.at is not None and tuple(args[0].shape[:2]) == self.at[2]
        if not self._gathered:
            return None
        rows, columns, _ = self.at
        return (args[0][rows, columns].unsqueeze(0), *args[1:])

    def _scatter(self, module, args, out):
        if not self._gathered:
            return None
        self._gathered = False
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"{type(module).__name__} returns {type(out).__name__}, not a tensor; "
                "set rm.share_prompt=false for this model"
            )
        rows, columns, shape = self.at
        return out.new_zeros((*shape, out.size(-1))).index_put((rows, columns), out[0])


def pair_scores(
    model: torch.nn.Module, pairs: SharedPrefixPairs, device: torch.device, reads: ReadPositions | None = None
) -> torch.Tensor:
    """[batch, 2]: the scalar at the last token of each pair's a and b, in one forward over rows
    that hold each pair's shared prefix once. Equal to `sequence_scores` of a and of b (the same
    function; the sums run in another order) when `takes_pair_masks(model)`. With `reads` (entered),
    the last block's MLP runs only where the scores are read."""
    inner = inner_model(model)
    mask = pairs.attention_mask(inner.config._attn_implementation, inner.dtype)
    last = pairs.last.to(device)
    if reads is not None:
        # Each position once: a and b read at the same token (one a prefix of the other) would
        # otherwise count that token's gradient twice.
        width = pairs.input_ids.size(1)
        flat = (torch.arange(last.size(0), device=device)[:, None] * width + last).flatten().unique()
        reads.at = (flat // width, flat % width, (last.size(0), width))
    values = values_of(
        model, pairs.input_ids.to(device), mask.to(device), position_ids=pairs.position_ids.to(device)
    )
    return values.gather(1, last)


def sequence_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The scalar at the last valid token of each row: the reward of the whole sequence."""
    values = values_of(model, input_ids, attention_mask)
    # Position of the last 1 in the mask, whether padding is on the left or the right.
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)
