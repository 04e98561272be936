"""LoRA adapters through peft: wrap a model, run it with the adapter off, merge it for saving.

With LoRA the frozen base weights are the reference policy: running the policy with its
adapter disabled gives exactly the starting model, so no second copy is held in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from rlhfkit.config import LoRAConfig


def apply_lora(
    model: PreTrainedModel, cfg: LoRAConfig, task: Literal["causal_lm", "reward"] = "causal_lm"
) -> PeftModel:
    """`model` with LoRA adapters on `cfg.target_modules`; only the adapters (and a reward head) train."""
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        # A reward model's scalar head is new: peft keeps it fully trainable (modules_to_save).
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ValueError(f"lora.target_modules={cfg.target_modules!r}: {exc}") from None


def is_lora(model: torch.nn.Module) -> bool:
    """True for a peft model (LoRA adapters on a frozen base)."""
    return isinstance(model, PeftModel)


def adapter_disabled(model: torch.nn.Module):
    """A context in which a LoRA model runs as its base (the reference); a no-op for other models."""
    return model.disable_adapter() if is_lora(model) else nullcontext()


@contextmanager
def reference_of(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The LoRA model itself with the adapter off, under no_grad: the reference policy."""
    with torch.no_grad(), adapter_disabled(model):
        yield model


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """A plain transformers model with the adapter merged into the weights; `model` is unchanged.

    A copy, because merging in place would end the adapter's training (checkpoints are saved
    mid-run); it costs one model's memory for the moment of saving.
    """
    return copy.deepcopy(model).merge_and_unload()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters); tied tensors count once."""
    params = list(model.parameters())  # parameters() already skips a tied tensor's second name
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def load_adapter_weights(model: PeftModel, saved_model_dir: str | Path) -> None:
    """Put the adapter saved by `save_model` in `saved_model_dir/adapter` back into `model`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from rlhfkit.models.loading import ADAPTER_DIR

    path = Path(saved_model_dir) / ADAPTER_DIR / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA adapter saved there (was lora.enabled off in that run?)")
    set_peft_model_state_dict(model, load_file(str(path)))
