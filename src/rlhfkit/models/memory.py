"""A memory estimate printed before training, so an out-of-memory run is seen coming.

The numbers are the usual rules of thumb, stated here once:
- weights: 4 bytes a parameter (models load in float32; mixed precision keeps float32 masters),
  except a QLoRA base's quantized ones: 1 byte (8-bit) or half a byte (4-bit, scales not counted);
- gradients: 4 bytes a trainable parameter; AdamW: two float32 moments, 8 bytes a trainable one;
- activations kept for the backward pass of a trained model: about 17 values a token per layer
  per hidden unit (Korthikanti et al. 2022, without the attention-score term that fused
  attention does not keep), in the compute precision; with gradient checkpointing only each
  layer's input (1 value) plus one layer being recomputed (17 values);
- logits: float32 logits and their log-softmax, 8 bytes a token per vocabulary entry, for
  every model whose output is read over the vocabulary (policy, reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATION_VALUES_PER_LAYER = 17
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class HeldModel:
    """One model a stage holds: its role, parameter counts and the shape that sizes activations."""

    role: str
    n_params: int
    n_trainable: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    reads_vocab: bool  # a causal LM whose log-probs are computed (policy, reference)
    on_device: bool = True  # False: offloaded to the CPU
    weight_bytes: int | None = None  # stored bytes of the weights; None: 4 a parameter (float32)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by kind, on the accelerator."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def held_model(role: str, model: torch.nn.Module, reads_vocab: bool, on_device: bool = True) -> HeldModel:
    """A HeldModel read off a transformers (or peft) model."""
    config = model.config
    params = list(model.parameters())  # a tied tensor is listed once
    stored = [_stored(p) for p in params]
    return HeldModel(
        role=role,
        n_params=sum(n for n, _ in stored),
        n_trainable=sum(p.numel() for p in params if p.requires_grad),
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        reads_vocab=reads_vocab,
        on_device=on_device,
        weight_bytes=sum(b for _, b in stored),
    )


def _stored(param: torch.Tensor) -> tuple[int, int]:
    """(parameters, bytes as held) of one weight tensor."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        # bitsandbytes 4-bit: two parameters packed in each byte of a flat tensor; the shape is here.
        return quant_state.shape.numel(), param.numel() * param.element_size()
    if not param.is_floating_point():
        return param.numel(), param.numel() * param.element_size()  # bitsandbytes 8-bit: int8
    return param.numel(), 4 * param.numel()


def estimate_memory(
    models: list[HeldModel], batch_tokens: int, dtype: str = "float32", gradient_checkpointing: bool = False
) -> MemoryEstimate:
    """Accelerator bytes for training with these models on `batch_tokens` tokens per forward."""
    act_bytes = BYTES[dtype]
    weights = gradients = optimizer = activations = logits = 0
    for m in models:
        if not m.on_device:
            continue
        weights += 4 * m.n_params if m.weight_bytes is None else m.weight_bytes
        gradients += 4 * m.n_trainable
        optimizer += 8 * m.n_trainable
        if m.n_trainable:
            per_layer = batch_tokens * m.hidden_size * act_bytes
            if gradient_checkpointing:
                activations += per_layer * (m.num_layers + ACTIVATION_VALUES_PER_LAYER)
            else:
                activations += per_layer * m.num_layers * ACTIVATION_VALUES_PER_LAYER
        if m.reads_vocab:
            logits += 8 * batch_tokens * m.vocab_size
    return MemoryEstimate(weights, gradients, optimizer, activations, logits)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_estimate(models: list[HeldModel], estimate: MemoryEstimate) -> str:
    """Lines for the console: the models held, then bytes by kind and the total."""
    lines = ["memory estimate (accelerator, per process):"]
    for m in models:
        where = "" if m.on_device else " (offloaded to CPU)"
        lines.append(
            f"  {m.role}: {m.n_params / 1e6:.1f}M parameters, {m.n_trainable / 1e6:.1f}M trained{where}"
        )
    for kind in ("weights", "gradients", "optimizer", "activations", "logits"):
        lines.append(f"  {kind}: {_gib(getattr(estimate, kind))}")
    lines.append(f"  total: {_gib(estimate.total)}")
    return "\n".join(lines)


def print_memory_estimate(
    models: list[HeldModel], batch_tokens: int, dtype: str, gradient_checkpointing: bool, enabled: bool = True
) -> MemoryEstimate:
    """Compute the estimate and print it (on the main process); returns it."""
    estimate = estimate_memory(models, batch_tokens, dtype, gradient_checkpointing)
    if enabled:
        from rich.console import Console

        Console().print(format_estimate(models, estimate), highlight=False, style="dim")
    return estimate
