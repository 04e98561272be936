"""Per-token and per-sequence scalar outputs of sequence-classification models.

A reward model and a PPO critic are both `*ForSequenceClassification` models with
one label; the reward is read at the last valid token, the value at every token.
"""

from __future__ import annotations

import copy

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


def last_block(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's last transformer block (of the class its `_no_split_modules` names, as FSDP wraps
    it), or None where there is none to find."""
    inner = inner_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or [])
    blocks = [m for m in inner.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    return blocks[-1] if blocks else None


def _child(module: torch.nn.Module | None, *names: str) -> torch.nn.Module | None:
    """The first of `names` that is a submodule of `module`."""
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, torch.nn.Module):
            return child
    return None


def last_block_mlp(model: torch.nn.Module) -> torch.nn.Module | None:
    """The `mlp` of the model's last transformer block, or None where there is none to find."""
    return _child(last_block(model), "mlp")


# The name under which `ReadPositions` registers its attention in transformers' AttentionInterface.
READ_ATTENTION = "rlhfkit_read_positions"


def _attention_at_reads(module, query, key, value, attention_mask, **kwargs):
    """sdpa with only the queries at the positions `module._read_positions.at` names; zeros at
    every other position (their outputs feed nothing that is read). Each read is one query of
    length 1 against its own row's keys and values, so the result there is sdpa's own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    reads = getattr(module, "_read_positions", None)
    at = None if reads is None else reads.at
    batch, _, width, _ = query.shape
    if at is None or at[2] != (batch, width) or attention_mask is None or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, columns, _ = at
    out, _ = sdpa_attention_forward(
        module,
        query[rows, :, columns].unsqueeze(2),
        key[rows],
        value[rows],
        attention_mask[rows, :, columns].unsqueeze(2),
        **kwargs,
    )
    # [reads, 1, heads, head_dim] back to sdpa's output layout [batch, width, heads, head_dim].
    full = out.new_zeros((batch, width, *out.shape[2:]))
    return full.index_put((rows, columns), out[:, 0]), None


class ReadPositions:
    """The last transformer block computed, where it can be, only at the positions scores are read from.

    A reward is read at one token of each sequence. In the last block, the keys and values are needed
    at every position, but the queries, the attention over them, the output projection and the MLP
    feed nothing but the output at their own position. While `at` holds (rows, columns, (batch,
    width)), hooks run those parts at the read positions only and add nothing elsewhere: the
    model's output is exact at those positions and wrong at every other, so only scores read there
    may be used (`pair_scores` sets `at` and reads only there).
    - Position-wise modules (the query projection `q_proj`, the output projection
      `o_proj`/`out_proj`/`c_proj`/`dense`, the norm after attention `post_attention_layernorm`/`ln_2`,
      the MLP, and the backbone's final norm `norm`/`ln_f`) are hooked: their input gathered at the
      read positions, their output scattered back into zeros.
    - Attention, when the model runs "sdpa": the last block's attention module gets its own copy of
      the config naming `READ_ATTENTION`, an sdpa over the read queries only (`_attention_at_reads`).
      Eager attention stays whole (still exact: its other positions feed only the gathered-away
      output projection).
    `at` stays set until the next call, so a backward that recomputes the block (gradient
    checkpointing) sees the same positions; a forward of another batch or width runs the block
    whole. A context manager: the hooks and the config copy leave with it. A model with no block to
    find is left whole (`active` is False). On a model of L blocks this saves nearly 1/L of the
    projections and MLPs, and 1/L of the attention: of the last block only its first norm, keys and
    values run at every position. On the bench model (4 blocks) a reward-model step (forward and
    backward) takes about 8% less time than with the MLP alone at the read positions."""

    def __init__(self, model: torch.nn.Module):
        block = last_block(model)
        attention = _child(block, "self_attn", "attn", "attention")
        inner = inner_model(model)
        backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
        self.mlp = _child(block, "mlp")
        self.attention = attention
        # Everything in the last block after the keys and values is position-wise, and so is the
        # backbone's final norm. Fused query-key-value projections (GPT-2's c_attn) cannot be split:
        # only a separate q_proj is run at the read positions.
        self.position_wise = [
            m
            for m in (
                _child(attention, "q_proj"),
                _child(attention, "o_proj", "out_proj", "c_proj", "dense"),
                _child(block, "post_attention_layernorm", "ln_2"),
                self.mlp,
                _child(backbone, "norm", "ln_f") if block is not None else None,
            )
            if m is not None
        ]
        self.at: tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None = None
        self._hooks: list = []
        self._gathered: set[int] = set()
        self._config = None

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def __enter__(self) -> ReadPositions:
        for module in self.position_wise:
            self._hooks += [
                module.register_forward_pre_hook(self._gather),
                module.register_forward_hook(self._scatter),
            ]
        config = getattr(self.attention, "config", None)
        if self._hooks and getattr(config, "_attn_implementation", None) == "sdpa":
            from transformers import AttentionInterface

            AttentionInterface.register(READ_ATTENTION, _attention_at_reads)
            self._config = config
            # A copy for this module alone: the other blocks, and the model's mask building, still
            # read the model's own config (so the ready-made masks pass as they are).
            own = copy.copy(config)
            own._attn_implementation_internal = READ_ATTENTION
            self.attention.config = own
            self.attention._read_positions = self
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._config is not None:
            self.attention.config = self._config
            del self.attention._read_positions
        self._hooks, self.at, self._config = [], None, None

    def _gather(self, module, args):
        if self.at is None or tuple(args[0].shape[:2]) != self.at[2]:
            self._gathered.discard(id(module))
            return None
        self._gathered.add(id(module))
        rows, columns, _ = self.at
        return (args[0][rows, columns].unsqueeze(0), *args[1:])

    def _scatter(self, module, args, out):
        if id(module) not in self._gathered:
            return None
        self._gathered.discard(id(module))
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
