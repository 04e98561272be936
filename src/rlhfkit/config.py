"""Typed run configuration: pydantic models, YAML loading, presets and `--set` overrides.

Every section forbids unknown keys, so a typo is an error that names the key instead
of a silent default.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


def import_callable(spec: str, what: str, expected: str = "an import path 'module:function'") -> Callable:
    """The callable a config names as "module:function"; else a ValueError naming `what` and the problem."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected {expected}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {module_name} has no callable {attr!r}")
    return fn


class ConfigError(ValueError):
    """A config file, preset or override that cannot be used; the message says why."""


def _numeric(annotation: Any) -> bool:
    """Whether a field holds a number (int or float, maybe optional), not a bool."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return bool not in args and any(arg in (int, float) for arg in args)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads yes/no/on/off/true as booleans, and pydantic would take True as 1:
        # `seed: yes` or `kl_coef: on` is a mistake to name, not a number.
        if (
            isinstance(value, bool)
            and info.field_name
            and _numeric(cls.model_fields[info.field_name].annotation)
        ):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def _save_every(default: int, unit: str = "steps") -> Any:
    """A training stage's checkpoint interval (see rlhfkit.train.checkpoint)."""
    return Field(
        default,
        ge=0,
        description=f"checkpoint every N {unit} for --resume (0: none on a schedule; SIGINT/SIGTERM "
        "always saves one)",
    )


def _keep_states() -> Any:
    """How many of a training stage's newest checkpoints keep what --resume needs."""
    return Field(
        1, ge=1, description="newest checkpoints keeping optimiser/RNG state; older keep only weights"
    )


class ModelConfig(Section):
    name_or_path: str | None = Field(
        None, description="hub id or local folder of a causal LM; unset = train a tiny one from scratch"
    )
    arch: Literal["llama", "qwen2", "gpt2"] = "llama"
    vocab_size: int = Field(4096, gt=256)
    superwords: bool = Field(
        False,
        description="tiny model's tokenizer: BPE merges may cross spaces, so a frequent multi-word "
        "phrase (a list item) is one token; newlines, digits and punctuation still split",
    )
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(384, gt=0)
    max_positions: int = Field(256, gt=16)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="compute precision (accelerate mixed precision; weights and optimiser stay float32)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass of trained models (less memory)"
    )
    offload_reference: bool = Field(
        False, description="keep the frozen reference model on the CPU (GPU memory for the policy)"
    )


class LoRAConfig(Section):
    """LoRA adapters (peft) on the trained model; the reference is the same weights, adapter off."""

    enabled: bool = Field(False, description="train LoRA adapters, not all weights (sft rm ppo dpo kto grpo)")
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: the update is (alpha / r) * B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names that get adapters (e.g. [q_proj, v_proj]), or all-linear"
    )
    quantize: Literal["4bit", "8bit"] | None = Field(
        None,
        description="QLoRA: load the trained model's base weights quantized by bitsandbytes (the adapters "
        "and a reward head stay float); needs enabled and pip install 'rlhfkit[qlora]'",
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4bit data type: nf4 (QLoRA's NormalFloat, for normal weights) or fp4"
    )
    double_quant: bool = Field(
        True, description="4bit: quantize the per-block scales too (about 0.4 bits a parameter less)"
    )

    @model_validator(mode="after")
    def _check_quantize(self) -> LoRAConfig:
        if self.quantize is None:
            return self
        if not self.enabled:
            raise ValueError(
                f"lora.quantize={self.quantize} needs lora.enabled=true: a quantized base is frozen, "
                "only adapters can train on it"
            )
        # find_spec, not import: importing bitsandbytes costs seconds, and the run imports it anyway.
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                f"lora.quantize={self.quantize} needs bitsandbytes, which is not installed: "
                "pip install 'rlhfkit[qlora]' (or set lora.quantize=null)"
            )
        return self


class RolloutConfig(Section):
    """How responses are sampled in ppo, grpo, rloo, bon and expert_iter, and how PPO scores them."""

    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: transformers generate; vllm: a vLLM engine colocated on the GPU, weights "
        "synced after each update (pip install 'rlhfkit[vllm]', needs CUDA)",
    )
    batch_size: int = Field(64, gt=0, description="prompts per generate call (hf backend; memory)")
    seed_per_prompt: bool = Field(
        False,
        description="PPO, GRPO, RLOO, hf backend: each prompt samples from a seed of (run seed, step, "
        "position in the rollout batch), so responses do not depend on the number of processes or batch_size",
    )
    forward_batch_size: int | None = Field(
        None,
        gt=0,
        description="rows per no-grad forward when PPO scores a rollout (policy, reference, critic, "
        "reward model); unset = the whole rollout batch at once",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="share of GPU memory the vLLM engine takes (weights + KV cache); the rest is "
        "left to training",
    )
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="precision of the vLLM engine's weights (auto: the checkpoint's)"
    )
    vllm_max_model_len: int | None = Field(
        None, gt=0, description="longest prompt + response the vLLM engine serves; unset = the model's"
    )

    @model_validator(mode="after")
    def _check_seeds(self) -> RolloutConfig:
        if self.seed_per_prompt and self.backend != "hf":
            raise ValueError(f"seed_per_prompt is implemented for backend hf only, not {self.backend}")
        return self


class DataConfig(Section):
    """Data files: .jsonl, .json (a list) or .parquet, or a Hugging Face dataset (a save_to_disk
    folder, FOLDER:SPLIT, or hf:NAME[:CONFIG]:SPLIT)."""

    task: str = Field("rlhfkit.tasks.top5", description="import path of a task module with build(seed)")
    prompts: Path | None = Field(None, description="rows of {prompt}: RL prompts instead of the task's")
    heldout_prompts: Path | None = Field(None, description="rows of {prompt} for evaluation")
    demonstrations: Path | None = Field(None, description="rows of {prompt, completion} for SFT")
    preferences: Path | None = Field(None, description="rows of {prompt, chosen, rejected} for the RM")
    unpaired: Path | None = Field(
        None, description="rows of {prompt, completion, label} for KTO; unset = derived from the pairs"
    )


class PretrainConfig(Section):
    steps: int = Field(1400, ge=0)
    batch_size: int = Field(8, gt=0)
    block_size: int = Field(128, gt=8)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    save_every: int = _save_every(500)
    keep_states: int = _keep_states()


class SFTConfig(Section):
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(5e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(128, gt=8)
    save_every: int = _save_every(100)
    keep_states: int = _keep_states()


class FeedbackConfig(Section):
    db: str | None = Field(None, description="database URL; unset = RUN/feedback.db (SQLite)")
    project: str = "top5-comparisons"
    n_prompts: int = Field(800, gt=0, description="prompts sent for comparison")
    completions_per_prompt: int = Field(
        2, ge=2, le=9, description="K samples per prompt: 2 = A/B comparison, 3-9 = annotators rank K"
    )
    overlap: int = Field(3, ge=1, description="annotators per item on the overlapped share")
    overlap_share: float = Field(
        1.0, ge=0, le=1, description="share of items labelled by `overlap` annotators (the rest by one)"
    )
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    pool: Path | None = Field(
        None, description="simulated annotator pool YAML (see crowd/pools); unset = the default pool"
    )
    aggregate: Literal["mv", "wawa", "ds", "mace", "bt", "noisy_bt"] = Field(
        "ds", description="how disagreeing labels become training pairs (ds: Dawid-Skene, see docs/crowd.md)"
    )
    margin: Literal["confidence", "strength"] = Field(
        "confidence",
        description="where a pair's margin (read by rm.soft_labels) comes from: confidence = "
        "2 * P(chosen wins) - 1 under feedback.aggregate; strength = mean 1..3 strength of the labels "
        "that chose the winner, / 3 (rankings and labels without a strength keep the confidence; "
        "see docs/crowd.md)",
    )

    @property
    def task_type(self) -> str:
        """The store's task type of the items: comparison (K = 2) or ranking."""
        return "comparison" if self.completions_per_prompt == 2 else "ranking"


class RMConfig(Section):
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    val_share: float = Field(0.1, ge=0, lt=1, description="share of pairs kept for validation")
    max_length: int = Field(128, gt=8)
    share_prompt: bool = Field(
        True,
        description="score chosen and rejected in one row that holds their common prefix (the prompt) once; "
        "the same rewards for less compute (sdpa/eager attention; other kernels use two rows)",
    )
    soft_labels: Literal["none", "margin", "smoothing"] = Field(
        "none",
        description="use a pair's margin in [0, 1] (2*confidence-1, or from the strengths: feedback.margin) "
        "as a BT margin or as label smoothing",
    )
    label_curve: list[float] = Field(
        [0.25, 0.5],
        description="label-efficiency curve: eval also trains RMs (not saved) on these shares of the labels "
        "and reports their held-out accuracy; [] = off",
    )
    save_every: int = _save_every(100)
    keep_states: int = _keep_states()

    @field_validator("label_curve")
    @classmethod
    def _check_label_curve(cls, fractions: list[float]) -> list[float]:
        for f in fractions:
            if not 0 < f < 1:
                raise ValueError(
                    f"each share of the labels must be between 0 and 1 (exclusive), got {f}; "
                    "the full set is the run's own reward model"
                )
        if len(set(fractions)) != len(fractions):
            raise ValueError(f"a share is listed twice in {fractions}")
        return sorted(fractions)


class RewardSpec(Section):
    """One term of a programmable reward: weight * fn(prompts, responses, **kwargs)."""

    fn: str = Field(
        description="built-in (reward_model, top5_format, length_penalty, repetition_penalty) "
        "or 'module:function' called as fn(prompts, responses, **kwargs) -> list[float]"
    )
    weight: float = Field(1.0, allow_inf_nan=False, description="multiplies this term in the sum")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to fn")


class PPOConfig(Section):
    """PPO / A2C against the reward model. Each detail of "The N Implementation Details of RLHF
    with PPO" is one switch here, named where it happens in rlhfkit/algos/ppo.py."""

    algorithm: Literal["ppo", "a2c"] = Field(
        "ppo", description="ppo: clipped ratio, several epochs; a2c: one on-policy step per rollout"
    )
    steps: int = Field(60, ge=0, description="rollout/update iterations")
    rollout_batch: int = Field(64, gt=0, description="prompts sampled per iteration")
    minibatch: int = Field(16, gt=0, description="rows per optimiser step (a2c: per micro-batch)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per mini-batch (memory; same gradient)")
    ppo_epochs: int = Field(2, gt=0, description="passes over each rollout (ppo only)")
    target_kl: float | None = Field(
        None, gt=0, description="stop an iteration's epochs once approx-KL(old||new) exceeds this"
    )
    # Optimisation
    lr: float = Field(1e-4, gt=0, description="policy learning rate")
    critic_lr: float = Field(2e-4, gt=0, description="critic learning rate (separate critic)")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon (OpenAI's baselines use 1e-5)")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="decay after warm-up, to 0 at the last step"
    )
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up iterations")
    max_grad_norm: float = Field(1.0, gt=0, description="global gradient-norm clip")
    freeze_layers: int = Field(
        0, ge=0, description="freeze the N lowest transformer blocks (and untied input embeddings)"
    )
    # Critic
    critic: Literal["separate", "shared"] = Field(
        "separate",
        description="separate: value model initialised from the reward model; shared: head on policy",
    )
    vf_coef: float = Field(0.5, gt=0, description="weight of the value loss")
    clip_value: float | None = Field(
        0.2, gt=0, description="value clipping range around old values; null: off"
    )
    # KL to the reference (the SFT policy)
    kl_coef: float = Field(0.1, ge=0, description="beta in r = score - beta * KL (initial value if adaptive)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL estimator")
    kl_mode: Literal["reward", "loss"] = Field(
        "reward", description="reward: per-token penalty in the reward; loss: a KL term in the policy loss"
    )
    kl_target: float | None = Field(
        None, gt=0, description="adaptive controller target KL (nats per response); null: fixed kl_coef"
    )
    kl_horizon: int = Field(10000, gt=0, description="adaptive controller horizon, in samples")
    # Reward
    reward_norm: bool = Field(
        False, description="gain/bias so SFT samples score mean 0, std 1 (raise kl_coef with it: docs/ppo.md)"
    )
    reward_norm_samples: int = Field(256, gt=1, description="SFT samples used to fit the gain/bias")
    reward_scaling: bool = Field(False, description="divide scores by their running std")
    reward_clip: float | None = Field(None, gt=0, description="clamp scores to [-c, c]; null: off")
    whiten_rewards: bool = Field(False, description="whiten per-token rewards over the batch (scale only)")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtracted from the score of responses with no EOS; null: off"
    )
    response_mode: Literal["eos", "fixed"] = Field(
        "eos", description="eos: stop at EOS; fixed: always max_new_tokens tokens (EOS suppressed)"
    )
    # Advantages and policy loss
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    whiten_advantages: Literal["batch", "minibatch", "none"] = Field(
        "batch", description="advantage whitening over the rollout, per mini-batch, or none"
    )
    clip_eps: float = Field(0.2, gt=0, description="policy ratio clip")
    dual_clip: float | None = Field(
        None, gt=1, description="dual-clip constant c > 1 (Ye et al. 2020); null: off"
    )
    ent_coef: float = Field(0.0, ge=0, description="entropy bonus weight")
    ptx_coef: float = Field(
        0.0, ge=0, description="PPO-ptx: weight of the pretraining LM loss on the task's corpus"
    )
    ptx_batch: int = Field(8, gt=0, description="pretraining blocks per mini-batch (PPO-ptx)")
    extra_rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="programmable reward terms added to the normalised RM score (verifiable, penalties)",
    )
    # Sampling: the same temperature divides the logits at rollout and in training.
    temperature: float = Field(1.0, gt=0, description="sampling temperature (also applied in training)")
    max_new_tokens: int = Field(48, gt=0, description="response length limit")
    # Checkpoints
    save_every: int = _save_every(10, "iterations (and at the last)")
    keep_states: int = _keep_states()

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.minibatch % self.grad_accum:
            raise ValueError(f"minibatch {self.minibatch} is not divisible by grad_accum {self.grad_accum}")
        if self.algorithm == "ppo" and self.rollout_batch % self.minibatch:
            raise ValueError(
                f"rollout_batch {self.rollout_batch} is not divisible by minibatch {self.minibatch}"
            )
        if self.kl_mode == "loss" and self.kl_estimator == "k1":
            # E_pi[grad log(pi / pi_ref)] = E_pi[grad log pi] = 0: as a loss, k1 pulls nowhere.
            raise ValueError(
                "kl_mode 'loss' needs kl_estimator k2 (the gradient of KL(pi || ref)) or k3: "
                "the k1 term's expected gradient is zero, so it would not keep the policy near the reference"
            )
        return self


class EvalConfig(Section):
    n_prompts: int = Field(240, gt=0, description="held-out prompts judged")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    heldout_pairs: int = Field(400, ge=0, description="gold-labelled pairs for RM accuracy")
    n_samples: int = Field(8, ge=0, description="sample outputs shown in the report")
    policies: list[str] = Field(
        default_factory=list,
        description="stage names (sft, ppo, dpo, ...) or model folders; empty = sft and every trained policy",
    )
    reference: str | None = Field(None, description="policy the others are compared with; unset = the first")
    judge: Literal["gold", "rm", "llm"] = Field("gold", description="who decides the win rate")
    judge_model: str | None = Field(None, description="model folder or hub id of the LLM judge (judge: llm)")
    ci_method: Literal["wilson", "bootstrap"] = Field("wilson", description="win-rate 95% interval")
    references: Path | None = Field(
        None, description="rows of {prompt, completion}: reference answers for ROUGE-L/BLEU"
    )


class OveroptConfig(Section):
    n_prompts: int = Field(24, gt=0, description="held-out prompts of the best-of-n sweep")
    samples_per_prompt: int = Field(256, ge=2, description="N: best-of-n is estimated for every n <= N")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    reward_models: list[Path] = Field(
        default_factory=list, description="more proxy RM folders (another size or data amount) besides rm/"
    )
    checkpoints: list[Path] = Field(
        default_factory=list, description="policy folders for the RL sweep; empty = RUN/ppo/checkpoints/*"
    )


def _reward_model_only() -> list[RewardSpec]:
    return [RewardSpec(fn="reward_model")]


class DPOConfig(Section):
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid = DPO, ipo = IPO")
    beta: float = Field(
        0.3,
        gt=0,
        description="inverse temperature of the implicit reward (top-5 task: 0.3, see docs/algorithms.md)",
    )
    label_smoothing: float = Field(
        0.2,
        ge=0,
        lt=0.5,
        description="assumed label-flip rate: > 0 is conservative DPO (sigmoid only); 0.2 for crowd labels "
        "that disagree with the truth about one time in four",
    )
    precompute_reference: bool = Field(
        True, description="reference log-probs computed once before training (else live each batch)"
    )
    epochs: float = Field(5.0, gt=0)
    batch_size: int = Field(16, gt=0, description="pairs per step")
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(128, gt=8, description="prompt + response tokens")
    share_prompt: bool = Field(
        True,
        description="chosen and rejected in one row that holds the prompt once (as rm.share_prompt); "
        "the same log-probs for less compute",
    )
    save_every: int = _save_every(100)
    keep_states: int = _keep_states()


class KTOConfig(Section):
    beta: float = Field(0.3, gt=0, description="inverse temperature of the implicit reward")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D, weight of thumbs-up examples")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U, weight of thumbs-down examples")
    precompute_reference: bool = Field(
        True, description="reference log-probs computed once before training (else live each batch)"
    )
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(16, gt=0, description="examples per step (>= 2: KL uses mismatched pairs)")
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(128, gt=8, description="prompt + response tokens")
    save_every: int = _save_every(100)
    keep_states: int = _keep_states()


class CriticFreeConfig(Section):
    """What GRPO, RLOO and REINFORCE++ share: sampling G responses per prompt, clipped updates."""

    steps: int = Field(60, ge=0, description="sample/update iterations")
    prompts_per_step: int = Field(16, gt=0)
    group_size: int = Field(4, ge=2, description="G: responses sampled per prompt")
    update_epochs: int = Field(2, gt=0, description="passes over each batch of samples")
    minibatch: int = Field(16, gt=0, description="responses per gradient step")
    lr: float = Field(5e-5, gt=0)
    clip_eps: float = Field(0.2, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    share_prompt: bool = Field(
        True,
        description="the responses to one prompt in one row that holds the prompt once, in the policy's "
        "and the reference's forwards; the same log-probs for less compute (sdpa/eager attention)",
    )
    rewards: list[RewardSpec] = Field(
        default_factory=_reward_model_only, min_length=1, description="weighted reward terms, summed"
    )
    save_every: int = _save_every(10)
    keep_states: int = _keep_states()


class GRPOConfig(CriticFreeConfig):
    kl_coef: float = Field(0.2, ge=0, description="beta of the k3 KL loss term")
    scale_rewards: bool = Field(True, description="divide by the group std (false: Dr. GRPO)")
    loss_normalisation: Literal["sequence", "token", "constant"] = Field(
        "sequence", description="sequence = GRPO, token = DAPO, constant = Dr. GRPO (sum / max_new_tokens)"
    )


class RLOOConfig(CriticFreeConfig):
    advantage: Literal["rloo", "reinforce_pp"] = Field(
        "rloo", description="rloo = leave-one-out baseline; reinforce_pp = REINFORCE++ (batch-whitened)"
    )
    kl_coef: float = Field(0.05, ge=0, description="beta of the KL penalty inside the reward")
    lr: float = Field(1e-4, gt=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"


class BestOfNConfig(Section):
    n: int = Field(8, ge=1, description="samples per prompt; the best under the rewards is kept")
    rewards: list[RewardSpec] = Field(default_factory=_reward_model_only, min_length=1)


class ExpertIterConfig(Section):
    rounds: int = Field(2, ge=1, description="sample best-of-n, fine-tune, repeat")
    n: int = Field(8, ge=2, description="samples per prompt")
    n_prompts: int = Field(512, gt=0, description="training prompts sampled per round")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    epochs: float = Field(1.0, gt=0, description="fine-tuning epochs over each round's best samples")
    batch_size: int = Field(16, gt=0)
    lr: float = Field(5e-5, gt=0)
    rewards: list[RewardSpec] = Field(default_factory=_reward_model_only, min_length=1)


class LoopConfig(Section):
    """Online iterated RLHF (`rlhfkit loop`): sampling, labelling, RM and PPO settings come from
    the feedback, rm and ppo sections; these say how many rounds and how each round collects."""

    rounds: int = Field(3, ge=1, description="rounds; round 1 is the demo's feedback, rm and ppo stages")
    prompts_per_round: int | None = Field(
        400,
        gt=0,
        description="prompts compared in every round, round 1 (the feedback stage) included: it sets "
        "feedback.n_prompts in a loop run; unset = feedback.n_prompts (800: the demo's one-shot budget)",
    )
    ppo_steps: int | None = Field(None, ge=0, description="PPO iterations of rounds 2..N; unset = ppo.steps")
    ppo_from: Literal["sft", "previous"] = Field(
        "sft",
        description="policy PPO starts from in rounds 2..N: sft (a fresh run against the new reward "
        "model) or previous (continue the last round's policy); the KL reference is SFT either way",
    )
    compare_with: Literal["policy", "sft"] = Field(
        "sft",
        description="what the current policy's samples are compared with in rounds 2..N: policy (K samples "
        "of it) or sft (one of the K samples is SFT's, so labels say what changed since SFT for the better "
        "or worse, where the policy exploits the reward model)",
    )
    aggregate: Literal["mv", "wawa", "ds", "mace", "bt", "noisy_bt"] | None = Field(
        None,
        description="how each round's labels become pairs (see `rlhfkit feedback aggregate`); "
        "unset = feedback.aggregate, as round 1's pairs",
    )
    annotators: Literal["simulated", "human"] = Field(
        "simulated", description="simulated: the feedback.pool labels each round; human: wait for people"
    )
    feedback_url: str | None = Field(
        None,
        pattern=r"^https?://\S+$",
        description="feedback service URL (http://host:port); unset = the run's feedback store",
    )
    feedback_user: str = Field(
        "admin", description="admin user on the service; its password is read from RLHFKIT_FEEDBACK_PASSWORD"
    )
    label_timeout: float = Field(3600.0, gt=0, description="seconds to wait for a round's labels")
    poll_seconds: float = Field(5.0, gt=0, description="seconds between two looks at labelling progress")
    min_complete: float = Field(
        1.0, gt=0, le=1, description="share of a round's items that must have all their labels"
    )


class RunConfig(Section):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    lora: LoRAConfig = LoRAConfig()
    rollout: RolloutConfig = RolloutConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    rm: RMConfig = RMConfig()
    ppo: PPOConfig = PPOConfig()
    eval: EvalConfig = EvalConfig()
    overopt: OveroptConfig = OveroptConfig()
    dpo: DPOConfig = DPOConfig()
    kto: KTOConfig = KTOConfig()
    grpo: GRPOConfig = GRPOConfig()
    rloo: RLOOConfig = RLOOConfig()
    bon: BestOfNConfig = BestOfNConfig()
    expert_iter: ExpertIterConfig = ExpertIterConfig()
    loop: LoopConfig = LoopConfig()

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, seed: int) -> int:
        # numpy's generators refuse a negative seed, and torch would take it as a different one;
        # numpy's legacy seeding (set by accelerate's set_seed) takes at most 32 bits.
        if not 0 <= seed < 2**32:
            raise ValueError(f"must be 0 or more and below 2**32 ({2**32}), got {seed}")
        return seed


def _is_section(annotation: Any) -> bool:
    """Whether a config field holds a section (a nested model) rather than a value."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# The top-level keys that are sections (all but `seed`).
_SECTION_NAMES = frozenset(
    name for name, field in RunConfig.model_fields.items() if _is_section(field.annotation)
)

# Sized so `rlhfkit demo --preset fast` finishes in about three minutes on 2 CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {
        # Smaller batches, more steps: the model learns which items belong to a topic after a
        # number of updates more than a number of tokens.
        "pretrain": {"steps": 1500, "batch_size": 4},
        # Fewer labels, and the overlap of version 0.1, keep the feedback stage short.
        "feedback": {"n_prompts": 600, "overlap_share": 0.3},
        "ppo": {"steps": 16, "rollout_batch": 48},
        "eval": {"n_prompts": 120, "heldout_pairs": 150},
    },
}


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _valid_keys(model: type[BaseModel], parts: list[str]) -> list[str]:
    for part in parts:
        field = model.model_fields.get(part)
        if field is None or not _is_section(field.annotation):
            break
        model = field.annotation
    return sorted(model.model_fields)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], c), the value read as YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. ppo.kl_coef=0.1")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from None
    return key.strip().split("."), parsed


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    model: type[BaseModel] = RunConfig
    node = tree
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            where = ".".join(path[:i]) or "the top level"
            raise ConfigError(
                f"unknown config key {'.'.join(path)!r}: {where} has no {part!r} "
                f"(valid: {', '.join(_valid_keys(RunConfig, path[:i]))})"
            )
        if i == len(path) - 1:
            node[part] = value
            return
        annotation = field.annotation
        if not _is_section(annotation):
            raise ConfigError(f"unknown config key {'.'.join(path)!r}: {part!r} is not a section")
        model = annotation
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], dict):
            raise ConfigError(
                f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is a section, but the config file "
                f"gives it the value {node[part]!r}"
            )
        node = node[part]


def _format_validation(exc: ValidationError, source: str, set_by: dict[str, str]) -> str:
    """The errors, one per line; a value that came from `--set` says so (`set_by`: key -> text)."""
    lines = [f"invalid config ({source}{' and --set' if set_by else ''}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        origin = next((text for key, text in set_by.items() if loc == key or loc.startswith(key + ".")), None)
        lines.append(f"  {loc}: {msg}" + (f" (from --set {origin})" if origin else ""))
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, preset: str = "default"
) -> RunConfig:
    """Preset, then the YAML file, then `--set` overrides, validated as one RunConfig."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose: {', '.join(PRESETS)})")
    tree: dict[str, Any] = _merge({}, PRESETS[preset])
    source = f"preset {preset}"
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path}: a directory, not a config file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        # A section written with nothing under it (`ppo:`) is an empty section, not null.
        loaded = {k: {} if v is None and k in _SECTION_NAMES else v for k, v in loaded.items()}
        tree = _merge(tree, loaded)
        source = str(path)
    set_by: dict[str, str] = {}
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply_override(tree, keys, value)
        set_by[".".join(keys)] = text
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source, set_by)) from None


def dump_config(config: RunConfig) -> str:
    """The fully resolved config as YAML (what RUN/config.yaml holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def dump_commented(model: BaseModel, indent: int = 0) -> str:
    """A config (or one section) as YAML with each field's description as a comment above it."""
    pad = "  " * indent
    lines: list[str] = []
    data = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip()
            if doc:
                lines += [f"{pad}# {line.strip()}" for line in doc.splitlines() if line.strip()]
            lines.append(f"{pad}{name}:")
            lines.append(dump_commented(value, indent + 1).rstrip("\n"))
            continue
        if field.description:
            lines.append(f"{pad}# {field.description}")
        dumped = yaml.safe_dump({name: data[name]}, sort_keys=False, default_flow_style=True, width=10_000)
        lines.append(pad + dumped.strip().removeprefix("{").removesuffix("}"))
    return "\n".join(lines) + "\n"
