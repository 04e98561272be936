"""Typed run configuration: pydantic models, YAML loading, presets and `--set` overrides.

Every section forbids unknown keys, so a typo is an error that names the key instead
of a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config file, preset or override that cannot be used; the message says why."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str | None = Field(
        None, description="hub id or local folder of a causal LM; unset = train a tiny one from scratch"
    )
    arch: Literal["llama", "qwen2"] = "llama"
    vocab_size: int = Field(4096, gt=256)
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(384, gt=0)
    max_positions: int = Field(256, gt=16)


class DataConfig(Section):
    task: str = Field("rlhfkit.tasks.top5", description="import path of a task module with build(seed)")
    prompts: Path | None = Field(None, description="JSONL of {prompt}: RL prompts instead of the task's")
    heldout_prompts: Path | None = Field(None, description="JSONL of {prompt} for evaluation")
    demonstrations: Path | None = Field(None, description="JSONL of {prompt, completion} for SFT")
    preferences: Path | None = Field(None, description="JSONL of {prompt, chosen, rejected} for the RM")


class PretrainConfig(Section):
    steps: int = Field(1400, ge=0)
    batch_size: int = Field(8, gt=0)
    block_size: int = Field(128, gt=8)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0)


class SFTConfig(Section):
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(5e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(128, gt=8)


class FeedbackConfig(Section):
    db: str | None = Field(None, description="database URL; unset = RUN/feedback.db (SQLite)")
    project: str = "top5-comparisons"
    n_prompts: int = Field(1500, gt=0, description="prompts sent for comparison")
    completions_per_prompt: int = Field(2, ge=2)
    overlap: int = Field(3, ge=1, description="annotators per item on the overlapped share")
    overlap_share: float = Field(0.3, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, gt=0)


class RMConfig(Section):
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    val_share: float = Field(0.1, ge=0, lt=1, description="share of pairs kept for validation")
    max_length: int = Field(128, gt=8)


class PPOConfig(Section):
    steps: int = Field(60, ge=0, description="rollout/update iterations")
    rollout_batch: int = Field(64, gt=0, description="prompts per rollout")
    minibatch: int = Field(16, gt=0)
    ppo_epochs: int = Field(2, gt=0)
    lr: float = Field(1e-4, gt=0)
    critic_lr: float = Field(2e-4, gt=0)
    kl_coef: float = Field(0.1, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_eps: float = Field(0.2, gt=0)
    clip_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    whiten_advantages: bool = True
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, gt=0)


class EvalConfig(Section):
    n_prompts: int = Field(240, gt=0, description="held-out prompts judged")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    heldout_pairs: int = Field(400, ge=0, description="gold-labelled pairs for RM accuracy")
    n_samples: int = Field(8, ge=0, description="sample outputs shown in the report")


class RunConfig(Section):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    rm: RMConfig = RMConfig()
    ppo: PPOConfig = PPOConfig()
    eval: EvalConfig = EvalConfig()


# Sized so `rlhfkit demo --preset fast` finishes in about three minutes on 2 CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {
        # Smaller batches, more steps: the model learns which items belong to a topic after a
        # number of updates more than a number of tokens.
        "pretrain": {"steps": 1500, "batch_size": 4},
        "feedback": {"n_prompts": 600},
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
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
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
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"unknown config key {'.'.join(path)!r}: {part!r} is not a section")
        model = annotation
        node = node.setdefault(part, {})


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {loc}: {msg}")
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
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = _merge(tree, loaded)
        source = str(path)
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply_override(tree, keys, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None


def dump_config(config: RunConfig) -> str:
    """The fully resolved config as YAML (what RUN/config.yaml holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
