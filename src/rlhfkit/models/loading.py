"""Load and save Hugging Face models: causal LMs, reward models, critics, tiny configs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhfkit.models.tokenizer import ensure_pad_token, prompt_token_ids, use_chat_turn_end_as_eos

if TYPE_CHECKING:
    from rlhfkit.config import RunConfig

# Sub-folder of a saved LoRA model that holds the adapter alone.
ADAPTER_DIR = "adapter"


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
    """A randomly initialised Llama-, Qwen2- or GPT-2-style causal LM sized for a CPU."""
    if arch not in ("llama", "qwen2", "gpt2"):
        raise ValueError(f"model.arch must be 'llama', 'qwen2' or 'gpt2', got {arch!r}")
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "gpt2":
        # GPT-2 names its sizes differently and has learned absolute positions, no KV groups.
        config = AutoConfig.for_model(
            "gpt2",
            vocab_size=len(tokenizer),
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_positions,
            tie_word_embeddings=True,
            **special,
        )
    else:
        config = AutoConfig.for_model(
            arch,
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **special,
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


# What AutoTokenizer reads from a folder: a fast tokenizer, or the config naming a slow one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_source(path: str | Path, model: bool = True) -> str:
    """`path` as from_pretrained takes it, once it is known not to be a missing local folder.

    A hub id is "name" or "org/name"; anything else (absolute, ./ or ~/, or deeper) is a folder
    here, and a missing one is a ValueError naming it, instead of transformers' complaint that it
    is no valid repo id. With `model`, a folder without a model's config.json is refused too."""
    text = str(path)
    folder = Path(text).expanduser()
    local = folder.exists() or text.startswith((".", "~", "/")) or text.count("/") > 1
    if local and not folder.is_dir():
        raise ValueError(f"model {text}: no such folder")
    if local and model and not (folder / "config.json").is_file():
        raise ValueError(f"model {text}: no saved model in that folder (no config.json)")
    if local and not model and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"model {text}: no tokenizer in that folder (none of {', '.join(TOKENIZER_FILES)})")
    return text


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a hub id or local folder, with a pad token guaranteed and, under a chat
    template, the token that ends an assistant turn as its EOS (`use_chat_turn_end_as_eos`).

    One without EOS (after the chat template's turn end is taken as one) is a ValueError naming it:
    responses end with EOS and sampling stops at it, and a tokenizer without a pad borrows EOS."""
    tokenizer = AutoTokenizer.from_pretrained(model_source(path, model=False))
    use_chat_turn_end_as_eos(tokenizer)
    if tokenizer.eos_token_id is None:
        has = (
            "neither a pad token nor an EOS token"
            if tokenizer.pad_token_id is None
            else f"a pad token ({tokenizer.pad_token}) but no EOS token"
        )
        raise ValueError(
            f"tokenizer {path}: it has {has}; rlhfkit ends every response with EOS (demonstrations are "
            "trained to end with it, sampling stops at it) and pads with the pad token (EOS where there "
            "is none): set eos_token (and pad_token) in its tokenizer_config.json"
        )
    ensure_pad_token(tokenizer)
    return tokenizer


# Config fields that size a learned position table, as transformers' configs name them.
POSITION_CONFIG_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


@dataclass(frozen=True)
class PositionTable:
    """A model's learned absolute position embeddings (GPT-2's wpe, OPT's embed_positions): a
    sequence holds at most `positions` tokens, where one more is an index error inside torch."""

    positions: int
    model_type: str
    config_key: str
    source: str

    def __str__(self) -> str:
        return (
            f"the {self.positions} positions of the learned position embeddings of {self.source} "
            f"({self.model_type}, {self.config_key})"
        )


def learned_position_embedding(model: torch.nn.Module) -> tuple[torch.nn.Embedding, str] | None:
    """`model`'s learned absolute position embeddings (GPT-2's wpe) and the config key that sizes
    them; None where positions are computed (RoPE, ALiBi, sinusoidal).

    The table is an nn.Embedding other than the token embeddings whose rows, less its `offset`
    (OPT keeps 2 spare rows), are a position count of the config; a token-type table is none."""
    sizes = model.config.to_dict()
    tokens = model.get_input_embeddings()
    for module in model.modules():
        if not isinstance(module, torch.nn.Embedding) or module is tokens:
            continue
        rows = module.num_embeddings - int(getattr(module, "offset", 0))
        for key in POSITION_CONFIG_KEYS:
            if sizes.get(key) == rows:
                return module, key
    return None


def learned_position_table(model: torch.nn.Module, source: str) -> PositionTable | None:
    """The learned position table of `model` (`source` names it: "model PATH"), read off its
    structure; None where positions are computed (RoPE, ALiBi, sinusoidal): no hard length limit."""
    found = learned_position_embedding(model)
    if found is None:
        return None
    module, key = found
    rows = module.num_embeddings - int(getattr(module, "offset", 0))
    return PositionTable(rows, model.config.model_type, key, source)


def position_table(path: str | Path) -> PositionTable | None:
    """`learned_position_table` of the model at `path`, built on the meta device from its config:
    no weights are read, so a stage can check its lengths before any long work. A config with
    rotary parameters (Llama, Qwen2, GPT-NeoX, Phi ...) computes its positions: None without
    building the model, which costs a stage's start about 10 ms even for the tiny default."""
    config = AutoConfig.from_pretrained(model_source(path))
    if getattr(config, "rope_parameters", None):
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return learned_position_table(model, f"model {path}")


def check_cut_sequences(
    table: PositionTable | None, key: str, max_length: int, lengths: Sequence[int], what: str
) -> None:
    """ValueError if a sequence, cut to `key`=`max_length` tokens, overruns `table`; `lengths`
    are the sequences' lengths after the cut, `what` names one ("demonstration")."""
    if table is None or not lengths or max(lengths) <= table.positions:
        return
    i = max(range(len(lengths)), key=lengths.__getitem__)
    raise ValueError(
        f"{key}={max_length} exceeds {table}, and {what} {i + 1} has {lengths[i]} tokens after the cut: "
        f"lower {key} to {table.positions} or less"
    )


def check_prompt_room(
    table: PositionTable | None,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    key: str | None,
    new_tokens: int,
) -> None:
    """ValueError if the longest prompt plus `new_tokens` response tokens (config `key`; None: a
    response cut to fit, at least one token) overruns `table`. Sampling stages never cut a prompt,
    nor do DPO and KTO (they cut the response), so a prompt too long is the data's to fix."""
    if table is None or not prompts:
        return
    lengths = [len(prompt_token_ids(tokenizer, p)) for p in prompts]
    i = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[i] + new_tokens <= table.positions:
        return
    text = " ".join(str(prompts[i]).split())
    start = text if len(text) <= 60 else text[:60] + "..."
    prompt = f"prompt {i + 1} ({lengths[i]} tokens: {start!r})"
    room = table.positions - lengths[i]
    shorten = f"shorten the prompts to at most {table.positions - 1} tokens (prompts are never cut)"
    if key is None:
        raise ValueError(f"{prompt} leaves no room for a response in {table}: {shorten}")
    fix = f"lower {key} to {room} or {shorten}" if room > 0 else shorten
    raise ValueError(
        f"{prompt} plus {key}={new_tokens} response tokens is {lengths[i] + new_tokens} tokens, more than "
        f"{table}: {fix}"
    )


def _quantized_loading(quantization: BitsAndBytesConfig | None) -> dict:
    """from_pretrained arguments that quantize the weights as they load (none without quantization)."""
    if quantization is None:
        return {}
    from accelerate import PartialState

    # Quantized weights are placed where they are quantized: this process's device (its own GPU
    # under accelerate launch), not wherever transformers would guess.
    return {"quantization_config": quantization, "device_map": {"": PartialState().device}}


def _one_4bit_function(model: PreTrainedModel) -> PreTrainedModel:
    """Every forward of the model's 4-bit layers computes alike, in their compute dtype.

    bitsandbytes (0.50) runs a 4-bit layer's eval-mode no-grad forward on CPUs with AVX512-BF16
    through a bf16 kernel on a repacked copy of the weight, and a training forward in the compute
    dtype. A QLoRA stage compares the two (the adapter-off reference against the policy: KL and
    implicit rewards are 0 at the start only if they are one function), and the repacked weight
    no longer dequantizes to what the layer computes, which a saved (merged) model relies on.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_causal_lm(path: str | Path, quantization: BitsAndBytesConfig | None = None) -> PreTrainedModel:
    """A causal LM from a hub id or a local folder (any architecture transformers knows).

    With `quantization` (QLoRA) its linear layers load quantized by bitsandbytes; the rest stays float32.
    """
    model = AutoModelForCausalLM.from_pretrained(
        model_source(path), dtype=torch.float32, **_quantized_loading(quantization)
    )
    return _one_4bit_function(model) if quantization is not None else model


def load_trainable(
    path: str | Path,
    config: RunConfig,
    task: Literal["causal_lm", "reward"] = "causal_lm",
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """The model a stage trains, loaded from `path`: quantized base (lora.quantize), checkpointing, LoRA.

    The one place a trained model is loaded, so every stage gets QLoRA the same way. A reward
    model (`task="reward"`) needs `pad_token_id`, as `load_reward_model`.
    """
    quantization = None
    if config.lora.quantize is not None:
        from rlhfkit.models.lora import quantization_config

        quantization = quantization_config(config.lora, config.model.dtype)
    if task == "causal_lm":
        model = load_causal_lm(path, quantization)
    else:
        if pad_token_id is None:
            raise ValueError("load_trainable: a reward model needs the tokenizer's pad_token_id")
        model = load_reward_model(path, pad_token_id, quantization)
    return make_trainable(model, config, task)


def make_trainable(
    model: PreTrainedModel, config: RunConfig, task: Literal["causal_lm", "reward"] = "causal_lm"
) -> PreTrainedModel:
    """The model a stage trains: gradient checkpointing and LoRA adapters as `config` asks."""
    from rlhfkit.models.lora import apply_lora, is_quantized

    if is_quantized(model):
        from peft import prepare_model_for_kbit_training

        # Freezes the quantized base and keeps its float layers (norms, embeddings) in float32;
        # checkpointing is left to the lines below, the same for quantized and float models.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.lora.enabled:
        model = apply_lora(model, config.lora, task)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> PreTrainedModel:
    """Recompute each block's activations in the backward pass instead of keeping them (less memory).

    transformers checkpoints only in train mode: a trained model must stay in it (`dropout_off`).
    """
    # Non-reentrant checkpointing works with frozen inputs (LoRA) and needs no input grads.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def dropout_off(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every dropout and put the model in train mode.

    RL losses compare log-probs of the same function at rollout and update, so dropout must be
    off; doing it this way instead of eval() keeps gradient checkpointing active (transformers
    checkpoints only in train mode).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Llama/Qwen2 attention applies dropout functionally, from a float on the module.
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model.train()


def load_reward_model(
    path: str | Path, pad_token_id: int, quantization: BitsAndBytesConfig | None = None
) -> PreTrainedModel:
    """A sequence-classification model with one output: the reward.

    Loading a causal-LM checkpoint here keeps its transformer and adds a fresh scalar
    head, which is how a reward model starts from the SFT model. With `quantization` the
    transformer loads quantized; transformers leaves the head (`score`) in float.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        model_source(path), num_labels=1, dtype=torch.float32, **_quantized_loading(quantization)
    )
    # The classifier reads the last non-pad token, so it must know which id is padding.
    model.config.pad_token_id = pad_token_id
    return _one_4bit_function(model) if quantization is not None else model


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """save_pretrained for the model and its tokenizer, into one folder.

    A LoRA model is saved merged (a plain transformers checkpoint) with its adapter alone
    in `out_dir/adapter` (peft's format, loadable onto the base with PeftModel). `state_dict`
    replaces the model's own weights: the gathered whole weights of a model sharded by FSDP
    or ZeRO-3 (`rlhfkit.train.distributed.save_trained`).
    """
    from rlhfkit.models.lora import is_lora, merged_copy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_lora(model):
        if state_dict is not None:
            # Merging runs on the module's own (here sharded) weights, not on a state dict.
            raise ValueError(
                "saving a LoRA model whose weights are sharded (FSDP) is not supported; "
                "train LoRA under DDP (examples/accelerate/ddp.yaml) instead"
            )
        model.save_pretrained(str(out_dir / ADAPTER_DIR))
        model = merged_copy(model)
    _stop_at_eos(model, tokenizer)
    model.save_pretrained(str(out_dir), state_dict=state_dict)
    tokenizer.save_pretrained(str(out_dir))


def _stop_at_eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Add the tokenizer's EOS to the model's generation config where it is missing: under a chat
    template that ends a turn with another token (`use_chat_turn_end_as_eos`) the trained model ends
    its answers with that token, and plain `generate` from the saved folder must stop there too."""
    config = getattr(model, "generation_config", None)
    eos = tokenizer.eos_token_id
    if config is None or eos is None:
        return
    current = config.eos_token_id
    stops = [] if current is None else [current] if isinstance(current, int) else list(current)
    if eos not in stops:
        config.eos_token_id = [*stops, eos] if stops else eos
