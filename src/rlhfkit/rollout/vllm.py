"""Sampling with a vLLM engine colocated with training (`rollout.backend: vllm`).

The engine lives in the training process, on the same GPU: it is built from the policy's
config with placeholder weights (`load_format="dummy"`), and before each sampling call in
which the policy has changed since the last one, the policy's current weights are loaded
into it with the model's own `load_weights` (reached through `LLM.apply_model`). So the
engine never samples from stale weights, and a freshly started engine never reads a
checkpoint from disk that the trainer already holds in memory.

Sampling matches `rollout.generate.generation_config`: pure temperature sampling (no top-k,
no top-p), `max_new_tokens`, `min_new_tokens` (EOS suppressed until then), stop at EOS. The
result has the structure `sample_responses` returns, so the loops do not care which ran.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator, Sequence
from functools import partial
from types import ModuleType
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rlhfkit.config import ConfigError, RolloutConfig
from rlhfkit.models.lora import is_lora, is_quantized
from rlhfkit.rollout.generate import cut_at_eos

INSTALL_HINT = "pip install 'rlhfkit[vllm]'"


def has_cuda() -> bool:
    """Whether a CUDA device is visible (vLLM's GPU engine needs one)."""
    return torch.cuda.is_available()


def import_vllm() -> ModuleType:
    """The vllm module, or a ConfigError that names `rollout.backend` and the fix."""
    # Engine core and worker inside this process (read when vllm starts an engine): apply_model
    # then hands the weight tensors over by reference instead of pickling them to another
    # process. A value the user set wins.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(
            f"rollout.backend=vllm: vllm is not importable ({exc}); install it with {INSTALL_HINT} "
            "on a machine with a CUDA GPU, or set rollout.backend=hf"
        ) from None
    if not has_cuda():
        raise ConfigError(
            "rollout.backend=vllm needs a CUDA GPU and none is visible (torch.cuda.is_available() "
            "is False); set rollout.backend=hf to sample with transformers generate"
        )
    if not hasattr(vllm.LLM, "apply_model"):
        raise ConfigError(
            f"rollout.backend=vllm: vllm {getattr(vllm, '__version__', '?')} has no LLM.apply_model, "
            f"which the weight sync needs; upgrade with {INSTALL_HINT} (vllm>=0.10)"
        )
    return vllm


def sampling_kwargs(eos_id: int, max_new_tokens: int, temperature: float, min_new_tokens: int = 0) -> dict:
    """`vllm.SamplingParams` arguments equal to `generation_config(...)` of the HF backend.

    top_k=-1 and top_p=1 keep the full softmax (PPO's log-probs assume it); temperature 0 is
    greedy in both backends. Text is not needed: the loops decode token ids themselves.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}"
        )
    return {
        "n": 1,
        "temperature": max(temperature, 0.0),
        "top_k": -1,
        "top_p": 1.0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": max_new_tokens,
        "min_tokens": min_new_tokens,
        "stop_token_ids": [eos_id],
        "ignore_eos": False,
        "detokenize": False,
    }


def response_tokens(token_ids: Sequence[int], finish_reason: str | None, eos_id: int) -> list[int]:
    """A vLLM completion as `sample_responses` returns one: up to and including EOS."""
    tokens = list(token_ids)
    # Stopped by EOS: make sure the EOS itself is kept, as HF generate keeps it.
    if finish_reason == "stop" and (not tokens or tokens[-1] != eos_id):
        tokens.append(eos_id)
    return cut_at_eos(tokens, eos_id)


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a causal LM in transformers' checkpoint naming, what `load_weights` reads.

    A LoRA (peft) model yields its base weights with the active adapters' updates added, the
    same numbers `merge_and_unload` would save, without touching the model.
    """
    if not is_lora(model):
        # parameters, not state_dict: a tied output embedding is yielded once, under its input name.
        for name, param in model.named_parameters():
            yield name, param.detach()
        return
    base = model.get_base_model()
    adapted = {
        name: module
        for name, module in base.named_modules()
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")
    }
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        owner, sep, leaf = name.rpartition(".base_layer.")
        if not sep:
            if ".modules_to_save." in name or ".original_module." in name:
                raise ValueError(
                    f"rollout.backend=vllm: cannot sync the peft weight {name!r} (modules_to_save); "
                    "use rollout.backend=hf with this adapter"
                )
            yield name, param.detach()
            continue
        tensor = param.detach()
        module = adapted.get(owner)
        if module is not None and leaf == "weight" and not module.merged:
            with torch.no_grad():
                for adapter in module.active_adapters:
                    if adapter in module.scaling:  # this layer has the adapter (linear or embedding)
                        tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
        yield f"{owner}.{leaf}", tensor


def _load_into(weights: list[tuple[str, torch.Tensor]], model: Any) -> Any:
    """Runs on the engine's model (through LLM.apply_model): load the policy's tensors."""
    load = getattr(model, "load_weights", None)
    if load is None:
        raise RuntimeError(f"the vLLM model {type(model).__name__} has no load_weights to take new weights")
    return load(weights)


def engine_config(model: torch.nn.Module) -> Any:
    """The policy's transformers config, naming its class (vLLM picks its model by `architectures`)."""
    base = model.get_base_model() if is_lora(model) else model
    config = copy.deepcopy(base.config)
    if not config.architectures:  # a model built in memory, never saved
        config.architectures = [type(base).__name__]
    return config


class VLLMSampler:
    """Samples from a vLLM engine in this process that holds the policy's current weights."""

    def __init__(
        self,
        rollout: RolloutConfig,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        seed: int = 0,
    ):
        if is_quantized(model):
            # policy_weights would hand the engine bitsandbytes' packed tensors as if they were weights.
            raise ConfigError(
                "rollout.backend=vllm cannot sync a quantized policy (lora.quantize) into the engine "
                "yet: use rollout.backend=hf with lora.quantize"
            )
        vllm = import_vllm()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise ConfigError(
                    "rollout.backend=vllm runs one engine in one training process; it is not wired "
                    "for several processes (accelerate launch) yet: use rollout.backend=hf there"
                )
        self.vllm, self.model = vllm, model
        self.eos_id = tokenizer.eos_token_id
        # The engine needs only the architecture: its weights come from the policy on first use.
        self._config_dir = tempfile.TemporaryDirectory(prefix="rlhfkit-vllm-")
        engine_config(model).save_pretrained(self._config_dir.name)
        kwargs: dict[str, Any] = {
            "model": self._config_dir.name,
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "dtype": rollout.vllm_dtype,
            "gpu_memory_utilization": rollout.vllm_gpu_memory_utilization,
            "seed": seed,
        }
        if rollout.vllm_max_model_len is not None:
            kwargs["max_model_len"] = rollout.vllm_max_model_len
        self.llm = vllm.LLM(**kwargs)
        self._synced_version: tuple[int, ...] | None = None

    def _weights_version(self) -> tuple[int, ...]:
        # Every in-place write to a parameter (optimiser step, load_state_dict) bumps its version
        # counter, so an unchanged tuple means the engine already holds these weights.
        return tuple(p._version for p in self.model.parameters())

    def sync_weights(self) -> None:
        """Load the policy's current weights into the engine."""
        weights = list(policy_weights(self.model))
        results = self.llm.apply_model(partial(_load_into, weights))
        for loaded in results or []:
            # Recent vLLM returns the names it loaded: none at all means the names did not match.
            if isinstance(loaded, set) and not loaded:
                raise RuntimeError(
                    f"vLLM loaded none of the policy's {len(weights)} tensors: its model "
                    f"({type(self.model).__name__}) names its weights differently"
                )
        self._synced_version = self._weights_version()

    def __call__(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        min_new_tokens: int = 0,
    ) -> list[list[int]]:
        """One response per prompt (token ids ending with EOS unless truncated), as the HF backend."""
        if self._weights_version() != self._synced_version:
            self.sync_weights()
        params = self.vllm.SamplingParams(
            **sampling_kwargs(self.eos_id, max_new_tokens, temperature, min_new_tokens)
        )
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            response_tokens(out.outputs[0].token_ids, out.outputs[0].finish_reason, self.eos_id)
            for out in outputs
        ]
