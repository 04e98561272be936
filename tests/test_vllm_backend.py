"""rollout.backend=vllm on CPU, with vLLM faked only at its boundary, and PPO's chunked scoring.

The fake `vllm` module (installed into sys.modules by a fixture) builds its model from the
config folder the backend hands it, exactly as vLLM's `load_format="dummy"` does (random
weights), samples with a real tiny transformers model from the SamplingParams it receives, and
its `load_weights` records every tensor and loads it. Responses are therefore real tokens of
whatever weights reached the engine: a broken weight sync shows up as different samples.
"""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import rlhfkit.rollout.vllm as vllm_backend
from rlhfkit.config import ConfigError, LoRAConfig, RolloutConfig, load_config
from rlhfkit.models.loading import load_reward_model, load_tokenizer, save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.rollout import make_sampler
from rlhfkit.rollout.batch import PromptResponseBatch, in_row_chunks, join_prompt_response
from rlhfkit.rollout.generate import generation_config, sample_responses
from rlhfkit.rollout.vllm import policy_weights, response_tokens, sampling_kwargs

PROMPTS = [f"Say a colour number {i}." for i in range(12)]
CORPUS = ["Say a colour number 3. red", "blue green red yellow", "a colour is red or blue"] * 20
PPO_SMALL = [
    "ppo.steps=2",
    "ppo.rollout_batch=4",
    "ppo.minibatch=2",
    "ppo.max_new_tokens=6",
    "ppo.reward_norm_samples=4",
]
GRPO_SMALL = ["grpo.steps=2", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.minibatch=4"]


# --- the fake vLLM: real field names, real model, recorded weight loads -----------------------


@dataclass
class FakeSamplingParams:
    """vllm.SamplingParams' fields that the backend may set (an unknown keyword is a TypeError)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    seed: int | None = None


class FakeEngineModel:
    """The engine's model as `LLM.apply_model` exposes it: `load_weights` takes (name, tensor)."""

    def __init__(self, hf: torch.nn.Module):
        self.hf = hf
        self.received: list[dict[str, torch.Tensor]] = []

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.hf.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)  # an unknown name is a KeyError, as in vLLM
                loaded.add(name)
        self.received.append({name: tensor.detach().clone() for name, tensor in weights})
        return loaded


class FakeLLM:
    """vllm.LLM for offline use: a placeholder-weight engine built from a config folder."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs: Any):
        assert kwargs["load_format"] == "dummy" and kwargs["skip_tokenizer_init"] is True
        self.kwargs = kwargs
        self.engine_in_process = vllm_backend.os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        config = AutoConfig.from_pretrained(kwargs["model"])
        assert config.architectures, "vLLM picks its model class from config.architectures"
        torch.manual_seed(1234)  # placeholder weights, unlike the policy's
        self.model = FakeEngineModel(AutoModelForCausalLM.from_config(config).eval())
        self.calls: list[tuple[int, FakeSamplingParams]] = []
        FakeLLM.instances.append(self)

    def apply_model(self, func: Any) -> list[Any]:
        return [func(self.model)]

    @torch.no_grad()
    def generate(self, prompts: list[dict], params: FakeSamplingParams, use_tqdm: bool = True) -> list[Any]:
        self.calls.append((len(prompts), params))
        assert params.n == 1 and not params.ignore_eos
        gen: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "min_new_tokens": params.min_tokens,
            "eos_token_id": params.stop_token_ids,
            "pad_token_id": params.stop_token_ids[0],
        }
        if params.temperature > 0:
            top_k = 0 if params.top_k in (0, -1) else params.top_k
            gen |= {
                "do_sample": True,
                "temperature": params.temperature,
                "top_k": top_k,
                "top_p": params.top_p,
            }
        else:
            gen |= {"do_sample": False}
        outputs = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            out = self.model.hf.generate(ids, attention_mask=torch.ones_like(ids), **gen)[0, ids.size(1) :]
            tokens = tuple(out.tolist())
            finish = "stop" if tokens and tokens[-1] in params.stop_token_ids else "length"
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, finish_reason=finish)]))
        return outputs


@pytest.fixture
def vllm_env_unset(monkeypatch) -> None:
    """VLLM_ENABLE_V1_MULTIPROCESSING unset during the test and removed after, whatever the backend sets."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")


@pytest.fixture
def fake_vllm(monkeypatch, vllm_env_unset) -> type[FakeLLM]:
    """A `vllm` module faked at its boundary; the device check passes (these tests run on CPU)."""
    module = types.ModuleType("vllm")
    module.__version__ = "0.0-fake"
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_backend, "has_cuda", lambda: True)
    FakeLLM.instances = []
    return FakeLLM


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A random-init policy and a reward model made from it, saved as HF folders."""
    root = tmp_path_factory.mktemp("vllm-models")
    tokenizer = train_tokenizer(CORPUS * 3, vocab_size=300)
    policy = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    save_model(policy, tokenizer, root / "sft")
    torch.manual_seed(0)
    save_model(load_reward_model(root / "sft", tokenizer.pad_token_id), tokenizer, root / "rm")
    return root / "sft", root / "rm"


def _prompt_ids(tokenizer: Any, n: int = 5) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:n]]


# --- sampling parameters and output structure ---------------------------------------------------


@pytest.mark.parametrize(("temperature", "min_new"), [(0.7, 0), (1.0, 9), (0.0, 3)])
def test_sampling_params_equal_the_hf_generation_config(temperature, min_new):
    hf = generation_config(
        eos_id=7, pad_id=0, max_new_tokens=9, temperature=temperature, min_new_tokens=min_new
    )
    vl = FakeSamplingParams(**sampling_kwargs(7, 9, temperature, min_new))
    assert vl.max_tokens == hf.max_new_tokens == 9
    assert vl.min_tokens == hf.min_new_tokens == min_new
    assert vl.stop_token_ids == [hf.eos_token_id] == [7] and not vl.ignore_eos
    assert vl.n == 1 and vl.repetition_penalty == 1.0 and vl.min_p == 0.0
    if temperature > 0:
        assert hf.do_sample and vl.temperature == hf.temperature == temperature
        # Neither truncates the distribution: HF top_k 0 / vLLM -1 mean "all tokens".
        assert hf.top_k == 0 and vl.top_k == -1 and hf.top_p == vl.top_p == 1.0
    else:
        assert not hf.do_sample and vl.temperature == 0.0  # greedy in both


def test_bad_lengths_are_errors():
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling_kwargs(7, 0, 1.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        sampling_kwargs(7, 4, 1.0, 5)


def test_response_tokens_match_the_hf_structure():
    # EOS kept and ends the response; truncated responses have no EOS; vLLM does not pad, so a
    # pad token id in an output was sampled and stays.
    assert response_tokens((5, 6, 7), "stop", eos_id=7) == [5, 6, 7]
    assert response_tokens((5, 6), "stop", eos_id=7) == [5, 6, 7]
    assert response_tokens((5, 6, 8), "length", eos_id=7) == [5, 6, 8]
    assert response_tokens((5, 0, 6), "length", eos_id=7) == [5, 0, 6]


def test_greedy_vllm_samples_equal_hf_generate(fake_vllm, models):
    """Greedy is deterministic: the same tokens prove the weights and the parameters arrived."""
    sft, _ = models
    tokenizer, policy = load_tokenizer(sft), AutoModelForCausalLM.from_pretrained(sft).eval()
    # A fresh init (std 0.02) answers every prompt with the same token; larger weights make
    # greedy outputs depend on the prompt and on the weights, so a missed sync cannot pass.
    torch.manual_seed(5)
    with torch.no_grad():
        for param in policy.parameters():
            param.normal_(0.0, 0.5)
    prompts = _prompt_ids(tokenizer)
    sample = make_sampler(RolloutConfig(backend="vllm"), policy, tokenizer, seed=3)
    got = sample(prompts, max_new_tokens=8, temperature=0.0)
    want = sample_responses(
        policy,
        prompts,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=8,
        temperature=0.0,
    )
    assert got == want
    assert len({tuple(r) for r in got}) > 1 and len({t for r in got for t in r}) > 2
    (engine,) = fake_vllm.instances
    assert engine.kwargs["dtype"] == "bfloat16" and engine.kwargs["gpu_memory_utilization"] == 0.3
    assert engine.kwargs["seed"] == 3 and "max_model_len" not in engine.kwargs
    assert engine.engine_in_process == "0"
    assert json.loads((Path(engine.kwargs["model"]) / "config.json").read_text())["vocab_size"] == len(
        tokenizer
    )


def test_sampled_responses_have_the_loops_structure(fake_vllm, models):
    sft, _ = models
    tokenizer, policy = load_tokenizer(sft), AutoModelForCausalLM.from_pretrained(sft)
    eos = tokenizer.eos_token_id
    rollout = RolloutConfig(backend="vllm", vllm_dtype="float32", vllm_max_model_len=64)
    sample = make_sampler(rollout, policy, tokenizer)
    prompts = _prompt_ids(tokenizer)
    free = sample(prompts, max_new_tokens=6, temperature=1.0)
    assert len(free) == len(prompts)
    for r in free:
        assert all(isinstance(t, int) for t in r) and 1 <= len(r) <= 6
        assert eos not in r[:-1] and (r[-1] == eos or len(r) == 6)
    fixed = sample(prompts, max_new_tokens=6, temperature=1.0, min_new_tokens=6)
    assert all(len(r) == 6 and eos not in r for r in fixed)
    (engine,) = fake_vllm.instances
    assert engine.kwargs["max_model_len"] == 64 and engine.kwargs["dtype"] == "float32"
    assert [(n, p.min_tokens, p.max_tokens) for n, p in engine.calls] == [(5, 0, 6), (5, 6, 6)]
    # Batched exactly like the HF path: prompt | response columns line up.
    batch = join_prompt_response(prompts, free, tokenizer.pad_token_id)
    assert batch.response_mask.sum(1).tolist() == [len(r) for r in free]


# --- weight sync ----------------------------------------------------------------------------------


def test_engine_receives_the_policy_weights_after_each_optimiser_step(fake_vllm, models):
    sft, _ = models
    tokenizer, policy = load_tokenizer(sft), AutoModelForCausalLM.from_pretrained(sft)
    sample = make_sampler(RolloutConfig(backend="vllm"), policy, tokenizer)
    prompts = _prompt_ids(tokenizer, 3)
    (engine,) = fake_vllm.instances
    assert engine.model.received == []  # nothing loaded until the first sampling call

    def assert_engine_holds_policy(loads: int) -> None:
        assert len(engine.model.received) == loads
        current = dict(policy.named_parameters())
        assert engine.model.received[-1].keys() == current.keys()
        for name, tensor in engine.model.received[-1].items():
            assert torch.equal(tensor, current[name].detach()), name
        for name, param in engine.model.hf.named_parameters():
            assert torch.equal(param, current[name]), name

    sample(prompts, max_new_tokens=4)
    assert_engine_holds_policy(1)
    sample(prompts, max_new_tokens=4)
    assert_engine_holds_policy(1)  # unchanged weights: no second copy sent

    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ids = torch.tensor(prompts[0])[None]
    policy(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    sample(prompts, max_new_tokens=4)
    assert_engine_holds_policy(2)
    changed = [n for n, t in engine.model.received[-1].items() if not torch.equal(t, before[n])]
    assert changed  # the step moved weights, and the engine got the moved ones


def test_lora_policy_is_synced_merged(fake_vllm, models):
    from rlhfkit.models.lora import apply_lora, merged_copy

    sft, _ = models
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(sft), LoRAConfig(enabled=True, r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a non-zero update, so merging matters
    synced = dict(policy_weights(policy))
    merged = dict(merged_copy(policy).named_parameters())
    assert synced.keys() == merged.keys()
    for name, tensor in synced.items():
        torch.testing.assert_close(tensor, merged[name], rtol=1e-6, atol=1e-6)
    assert any(
        not torch.equal(synced[n], p) for n, p in AutoModelForCausalLM.from_pretrained(sft).named_parameters()
    )


def test_engine_config_names_the_architecture_of_an_unsaved_or_lora_model(models):
    from rlhfkit.models.lora import apply_lora
    from rlhfkit.rollout.vllm import engine_config

    sft, _ = models
    fresh = tiny_causal_lm(load_tokenizer(sft), arch="qwen2", hidden_size=32, num_layers=1, num_heads=2)
    assert not fresh.config.architectures
    assert engine_config(fresh).architectures == ["Qwen2ForCausalLM"]
    assert not fresh.config.architectures  # the model's own config is left alone
    lora = apply_lora(AutoModelForCausalLM.from_pretrained(sft), LoRAConfig(enabled=True, r=4))
    assert engine_config(lora).architectures == ["LlamaForCausalLM"]
    assert engine_config(lora).vocab_size == lora.get_base_model().config.vocab_size


# --- errors at start ------------------------------------------------------------------------------


def test_without_vllm_the_error_names_the_key_and_the_fix(monkeypatch, vllm_env_unset, models):
    sft, _ = models
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    tokenizer, policy = load_tokenizer(sft), AutoModelForCausalLM.from_pretrained(sft)
    with pytest.raises(ConfigError, match=r"rollout\.backend=vllm.*pip install 'rlhfkit\[vllm\]'"):
        make_sampler(RolloutConfig(backend="vllm"), policy, tokenizer)


def test_without_cuda_the_error_says_a_gpu_is_needed(fake_vllm, monkeypatch, models):
    sft, _ = models
    monkeypatch.setattr(vllm_backend, "has_cuda", lambda: False)
    tokenizer, policy = load_tokenizer(sft), AutoModelForCausalLM.from_pretrained(sft)
    with pytest.raises(ConfigError, match=r"rollout\.backend=vllm needs a CUDA GPU.*rollout\.backend=hf"):
        make_sampler(RolloutConfig(backend="vllm"), policy, tokenizer)
    assert fake_vllm.instances == []  # failed before starting an engine


def test_a_vllm_without_apply_model_is_refused(fake_vllm, monkeypatch, models):
    sft, _ = models
    monkeypatch.setattr(sys.modules["vllm"], "LLM", type("OldLLM", (), {}))
    tokenizer, policy = load_tokenizer(sft), AutoModelForCausalLM.from_pretrained(sft)
    with pytest.raises(ConfigError, match=r"0\.0-fake has no LLM\.apply_model.*vllm>=0\.10"):
        make_sampler(RolloutConfig(backend="vllm"), policy, tokenizer)


def test_rollout_config_keys_are_validated():
    cfg = load_config(overrides=["rollout.backend=vllm", "rollout.vllm_gpu_memory_utilization=0.5"])
    assert cfg.rollout.backend == "vllm" and cfg.rollout.vllm_gpu_memory_utilization == 0.5
    for bad, key in [
        ("rollout.backend=sglang", "rollout.backend"),
        ("rollout.vllm_gpu_memory_utilization=1.5", "rollout.vllm_gpu_memory_utilization"),
        ("rollout.forward_batch_size=0", "rollout.forward_batch_size"),
        ("rollout.vllm_dtype=int8", "rollout.vllm_dtype"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=[bad])


# --- the loops, end to end ------------------------------------------------------------------------


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_runs_end_to_end_on_the_vllm_backend(fake_vllm, models, tmp_path):
    from rlhfkit.train.ppo import run_ppo

    sft, rm = models
    cfg = load_config(overrides=[*PPO_SMALL, "rollout.backend=vllm", "ppo.reward_norm=true"])
    run_ppo(cfg, sft, rm, PROMPTS, tmp_path, show_progress=False)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["reward/score"]) and math.isfinite(r["kl"]) for r in rows)
    (engine,) = fake_vllm.instances
    # Reward-norm rollout and step 1 share the starting weights; step 2 samples after an update.
    assert [n for n, _ in engine.calls] == [4, 4, 4]
    assert len(engine.model.received) == 2
    start = dict(AutoModelForCausalLM.from_pretrained(sft).named_parameters())
    first, second = engine.model.received
    assert all(torch.equal(first[n], start[n]) for n in start)
    assert any(not torch.equal(second[n], start[n]) for n in start)


def test_grpo_runs_end_to_end_on_the_vllm_backend(fake_vllm, models, tmp_path):
    from rlhfkit.train.grpo import run_critic_free
    from rlhfkit.train.rewards import build_reward_functions

    sft, rm = models
    cfg = load_config(overrides=[*GRPO_SMALL, "grpo.max_new_tokens=6", "rollout.backend=vllm"])
    terms = build_reward_functions(cfg.grpo.rewards, rm)
    summary = run_critic_free(cfg, "grpo", sft, terms, PROMPTS, tmp_path, show_progress=False)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and math.isfinite(summary["final_reward"])
    (engine,) = fake_vllm.instances
    assert [n for n, _ in engine.calls] == [4, 4]  # prompts_per_step * group_size
    assert len(engine.model.received) == 2  # before step 1, and after step 1's update


# --- micro-batched scoring ------------------------------------------------------------------------


def test_in_row_chunks_concatenates_tensors_tuples_and_none():
    batch = join_prompt_response([[1, 2], [3], [4, 5, 6], [7], [8, 9]], [[1], [2, 3], [4], [5, 6, 7], [8]], 0)
    calls = []

    def fn(mb: PromptResponseBatch) -> tuple[torch.Tensor, None]:
        calls.append(mb.input_ids.size(0))
        return mb.input_ids.sum(1), None

    whole = in_row_chunks(fn, batch, None)
    for rows, sizes in [(1, [1] * 5), (3, [3, 2]), (5, [5]), (9, [5])]:
        calls.clear()
        got = in_row_chunks(fn, batch, rows)
        assert torch.equal(got[0], whole[0]) and got[1] is None and calls == sizes
    assert torch.equal(in_row_chunks(lambda mb: mb.response_mask, batch, 2), batch.response_mask)
    with pytest.raises(ValueError, match="rows per chunk"):
        in_row_chunks(fn, batch, 0)


def test_chunked_scoring_forwards_equal_the_whole_batch(models):
    """Log-probs, values (shared head and separate critic), reference log-probs and RM scores."""
    from rlhfkit.models.heads import sequence_scores
    from rlhfkit.train.ppo import PolicyValue, critic_values, policy_logprobs_values

    sft, rm = models
    gen = torch.Generator().manual_seed(0)
    # Seven rows of different prompt and response lengths: chunks see different paddings.
    prompts = [torch.randint(5, 200, (2 + i % 4,), generator=gen).tolist() for i in range(7)]
    responses = [torch.randint(5, 200, (1 + (2 * i) % 5,), generator=gen).tolist() for i in range(7)]
    batch = join_prompt_response(prompts, responses, pad_id=0)
    policy = AutoModelForCausalLM.from_pretrained(sft).eval()
    torch.manual_seed(0)
    actor = PolicyValue(policy, torch.nn.Linear(policy.config.hidden_size, 1, bias=False)).eval()
    reference = PolicyValue(AutoModelForCausalLM.from_pretrained(sft).eval(), None)
    reward = load_reward_model(rm, 0).eval()
    forwards = {
        "policy": lambda mb: policy_logprobs_values(actor, mb, 0.7),
        "critic": lambda mb: critic_values(reward, mb),
        "reference": lambda mb: policy_logprobs_values(reference, mb, 0.7)[0],
        "reward": lambda mb: sequence_scores(reward, mb.input_ids, mb.attention_mask),
    }

    def as_tuple(out: Any) -> tuple:
        return out if isinstance(out, tuple) else (out,)

    with torch.no_grad():
        for name, fn in forwards.items():
            whole = in_row_chunks(fn, batch, None)
            for rows in (1, 3, 7):
                chunked = in_row_chunks(fn, batch, rows)
                pairs = zip(as_tuple(whole), as_tuple(chunked), strict=True)
                for a, b in pairs:
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"{name}, {rows} rows")


def test_ppo_scores_in_chunks_of_forward_batch_size(models, tmp_path, monkeypatch):
    """The loop really chunks its forwards, and step 1's scores are those of one big forward."""
    import rlhfkit.train.ppo as ppo

    sft, rm = models
    real = ppo.sequence_scores
    rows_seen: list[int] = []

    def spy(model, input_ids, attention_mask):
        rows_seen.append(input_ids.size(0))
        return real(model, input_ids, attention_mask)

    monkeypatch.setattr(ppo, "sequence_scores", spy)
    first: dict[str, dict] = {}
    for chunk in (None, 3):
        rows_seen.clear()
        extra = [] if chunk is None else [f"rollout.forward_batch_size={chunk}"]
        out = tmp_path / f"chunk-{chunk}"
        ppo.run_ppo(load_config(overrides=PPO_SMALL + extra), sft, rm, PROMPTS, out, show_progress=False)
        assert rows_seen == ([4, 4] if chunk is None else [3, 1, 3, 1])
        first[str(chunk)] = _metrics(out)[0]
    for key in ("reward/raw", "kl", "reward/score"):
        assert first["3"][key] == pytest.approx(first["None"][key], rel=1e-5, abs=1e-6), key
