"""LoRA adapters through peft: wrap a model, run it with the adapter off, merge it for saving.

With LoRA the frozen base weights are the reference policy: running the policy with its
adapter disabled gives exactly the starting model, so no second copy is held in memory.
QLoRA (`lora.quantize`) holds that frozen base quantized by bitsandbytes; the adapters train
in float on top of it, and saving folds them into a dequantized float copy of the base.
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
from peft.tuners.lora import LoraLayer
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

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


def quantization_config(cfg: LoRAConfig, compute_dtype: str = "float32") -> BitsAndBytesConfig:
    """transformers' bitsandbytes settings for `cfg.quantize`; 4-bit layers compute in `compute_dtype`.

    The compute dtype is `model.dtype` rather than a setting of its own: it is the precision the
    rest of the model computes in, and a 4-bit layer dequantizes its weights to it per matmul.
    """
    if cfg.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if cfg.quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        )
    raise ValueError(f"lora.quantize must be 4bit or 8bit for a quantization config, got {cfg.quantize!r}")


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a transformers model (or a peft model on one) loaded with bitsandbytes quantization."""
    base = model.get_base_model() if is_lora(model) else model
    return bool(getattr(base, "is_quantized", False))


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
    mid-run); it costs one model's memory for the moment of saving. A quantized base (QLoRA)
    is dequantized to float32 first, so the result is a plain float checkpoint.
    """
    if is_quantized(model):
        return _dequantized_merge(model)
    return copy.deepcopy(model).merge_and_unload()


def _dequantized_merge(model: PeftModel) -> PreTrainedModel:
    """A QLoRA model as a float32 transformers model: each quantized weight dequantized, plus its update.

    peft's own merge adds the update and quantizes the sum again, which rounds most of a small
    update away and leaves a checkpoint that needs bitsandbytes to load. The dequantized base
    plus the update is the function the adapters were trained on (to float rounding for 4-bit;
    8-bit layers compute through int8 matmuls, which the float weights match to a few 1e-2).
    """
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_module_weight

    def quantized_layer(module: torch.nn.Module) -> bool:
        return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)

    work = copy.deepcopy(model)
    base = work.get_base_model()
    updates: dict[str, torch.Tensor] = {}
    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer) and quantized_layer(module.get_base_layer()):
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active:
                updates[name] = sum(module.get_delta_weight(a).float() for a in active)
            # Unwrapped by hand, so peft's merge below never re-quantizes this layer.
            base.set_submodule(name, module.get_base_layer())
    # Adapters on float layers and a reward head's trained copy (modules_to_save) merge as usual.
    merged = work.merge_and_unload()
    # The architecture as saved: bitsandbytes replaced GPT-2's Conv1D layers by Linear ones too.
    with torch.device("meta"):
        skeleton = type(merged)(merged.config)
    for name, module in list(merged.named_modules()):
        if not quantized_layer(module):
            continue
        weight = dequantize_module_weight(module).detach().float() + updates.get(name, 0.0)
        original = skeleton.get_submodule(name)
        if isinstance(original, Conv1D):  # stores its weight as [in, out]
            plain = Conv1D(module.out_features, module.in_features)
            plain.weight = torch.nn.Parameter(weight.T.contiguous())
        else:
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight = torch.nn.Parameter(weight)
        if module.bias is not None:
            plain.bias = torch.nn.Parameter(module.bias.detach().float())
        merged.set_submodule(name, plain.to(weight.device))
    merged.hf_quantizer.remove_quantization_config(merged)
    return merged


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
