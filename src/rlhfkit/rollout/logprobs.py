"""Log-probabilities of given tokens under a causal LM, padding-safe."""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether `model` (under peft / DDP wrappers) takes `logits_to_keep` in its forward."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return "logits_to_keep" in inspect.signature(model.forward).parameters


def response_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_response: int,
    temperature: float = 1.0,
    with_hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (divided by the sampling temperature) that predicted the last `n_response` tokens,
    and with `with_hidden` the last hidden state at the same positions (for a value head)."""
    # The LM head (vocab x hidden, the largest matmul of a small model) only where it is read:
    # the response positions and the one before them, not the prompt.
    keep = {"logits_to_keep": n_response + 1} if accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=with_hidden,
        use_cache=False,
        **keep,
    )
    # Position t predicts token t + 1: the response's logits start one before it.
    logits = out.logits[:, -n_response - 1 : -1].float()
    if temperature != 1.0:  # skip a [batch, n_response, vocab] copy when it would change nothing
        logits = logits / temperature
    hidden = out.hidden_states[-1][:, -n_response - 1 : -1] if with_hidden else None
    return logits, hidden


def response_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_response: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Logits (divided by the sampling temperature) that predicted the last `n_response` tokens."""
    return response_forward(model, input_ids, attention_mask, n_response, temperature)[0]


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] at each position, as logit[token] - logsumexp(logits).

    Equal to gathering from log_softmax, without writing a [batch, T, vocab] log-softmax.
    """
    picked = torch.gather(logits, 2, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def response_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_response: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs of the last `n_response` tokens of each row: [batch, n_response]."""
    logits = response_logits(model, input_ids, attention_mask, n_response, temperature)
    return gather_logprobs(logits, input_ids[:, -n_response:])
