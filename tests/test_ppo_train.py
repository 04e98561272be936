"""The PPO stage on a tiny local model: every switch runs, accumulation, freezing, exact resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.config import load_config
from rlhfkit.models.loading import load_reward_model, save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.train.checkpoint import STATE_FILE, checkpoint_steps
from rlhfkit.train.ppo import decoder_blocks, freeze_lower_layers, run_ppo

PROMPTS = [f"Say a colour number {i}." for i in range(12)]
CORPUS = ["Say a colour number 3. red", "blue green red yellow", "a colour is red or blue"] * 20

TASK_MODULE = textwrap.dedent(
    """
    from rlhfkit.tasks import Task

    def build(seed):
        prompts = [f"Say a colour number {i}." for i in range(12)]
        return Task(name="colours", train_prompts=prompts, heldout_prompts=prompts[:4],
                    demonstrations=[{"prompt": p, "completion": "red"} for p in prompts])
    """
)
SMALL = [
    "ppo.steps=2",
    "ppo.rollout_batch=4",
    "ppo.minibatch=2",
    "ppo.max_new_tokens=6",
    "ppo.reward_norm_samples=4",
    "pretrain.block_size=16",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A random-init policy and a reward model made from it, saved as HF folders."""
    root = tmp_path_factory.mktemp("ppo-models")
    tokenizer = train_tokenizer(CORPUS * 3, vocab_size=300)
    policy = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    save_model(policy, tokenizer, root / "sft")
    reward = load_reward_model(root / "sft", tokenizer.pad_token_id)
    save_model(reward, tokenizer, root / "rm")
    return root / "sft", root / "rm"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


VARIANTS = {
    "default": [],
    "a2c": ["ppo.algorithm=a2c", "ppo.grad_accum=2", "ppo.minibatch=2"],
    "shared_critic_kl_loss_adaptive": [
        "ppo.critic=shared",
        "ppo.kl_mode=loss",
        "ppo.kl_estimator=k3",
        "ppo.kl_target=1.0",
        "ppo.kl_horizon=100",
        "ppo.whiten_advantages=minibatch",
        "ppo.dual_clip=3.0",
        "ppo.ent_coef=0.01",
        "ppo.target_kl=1e-8",
        "ppo.reward_norm=true",
        "ppo.missing_eos_penalty=1.0",
        "ppo.adam_eps=1e-5",
    ],
    "extra_rewards": [
        "ppo.extra_rewards=[{fn: top5_format, weight: 0.5}, {fn: repetition_penalty},"
        " {fn: reward_model, weight: 0.1}]"
    ],
    "ptx_freeze_fixed_scaling": [
        "ppo.ptx_coef=0.5",
        "ppo.ptx_batch=2",
        "ppo.freeze_layers=1",
        "ppo.response_mode=fixed",
        "ppo.reward_scaling=true",
        "ppo.reward_clip=2.0",
        "ppo.whiten_rewards=true",
        "ppo.clip_value=null",
        "ppo.lr_schedule=cosine",
        "ppo.warmup_steps=1",
    ],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_switch_runs_and_logs(variant, models, tmp_path):
    sft, rm = models
    cfg = load_config(overrides=SMALL + VARIANTS[variant])
    out = tmp_path / "ppo"
    summary = run_ppo(cfg, sft, rm, PROMPTS, out, show_progress=False, ptx_corpus=CORPUS)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/score", "kl", "entropy", "clipfrac", "approxkl", "loss/value", "response_length"):
        assert all(r[key] is not None and math.isfinite(r[key]) for r in rows), key
    assert "explained_variance" in rows[0]
    policy = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in policy.parameters()) > 0
    # The last step is always a checkpoint, loadable as a plain HF model.
    assert [s for s, _ in checkpoint_steps(out / "checkpoints")] == [2]
    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-2")
    assert math.isfinite(summary["final_score"])
    if variant == "extra_rewards":
        assert all(
            "reward/top5_format" in r and "reward/repetition_penalty" in r and "reward/reward_model" in r
            for r in rows
        )
    if variant == "a2c":
        assert all(r["epochs"] == 1 and r["clipfrac"] == 0.0 for r in rows)
    if variant == "shared_critic_kl_loss_adaptive":
        # KL far below the target: the adaptive controller lowers beta step by step.
        assert rows[1]["kl_coef"] < rows[0]["kl_coef"]
        # A tiny target_kl stops after the first epoch.
        assert all(r["epochs"] == 1 for r in rows)
        # Reward normalisation fitted a gain/bias on the SFT samples.
        assert summary["reward_gain"] != 1.0 and summary["reward_bias"] != 0.0
    if variant == "ptx_freeze_fixed_scaling":
        assert all(r["response_length"] == 6 for r in rows) and all(r["eos_share"] == 0 for r in rows)
        assert all(r["loss/ptx"] > 0 for r in rows)
        before = AutoModelForCausalLM.from_pretrained(sft)
        frozen, trained = decoder_blocks(before)[0], decoder_blocks(policy)[0]
        for a, b in zip(frozen.parameters(), trained.parameters(), strict=True):
            assert torch.equal(a, b)
        assert not torch.equal(
            decoder_blocks(before)[1].mlp.up_proj.weight, decoder_blocks(policy)[1].mlp.up_proj.weight
        )


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_gradient_accumulation_equals_one_large_batch(critic, models):
    """The gradient of a mini-batch is the same in one piece or as micro-batches (PPO's losses,
    value loss, entropy bonus and KL-as-loss term included)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rlhfkit.rollout.batch import join_prompt_response
    from rlhfkit.train.ppo import PolicyValue, _micro_step

    sft, rm = models
    cfg = load_config(
        overrides=[f"ppo.critic={critic}", "ppo.ent_coef=0.01", "ppo.kl_mode=loss", "ppo.kl_estimator=k3"]
    ).ppo
    gen = torch.Generator().manual_seed(0)
    # Eight rows of different prompt and response lengths: the token counts of micro-batches differ.
    prompts = [torch.randint(5, 200, (3 + i % 3,), generator=gen).tolist() for i in range(8)]
    responses = [torch.randint(5, 200, (1 + (3 * i) % 6,), generator=gen).tolist() for i in range(8)]
    batch = join_prompt_response(prompts, responses, pad_id=0)
    mask = batch.response_mask.float()
    shape = mask.shape
    old_logp, ref_logp = -torch.rand(shape, generator=gen) * 3, -torch.rand(shape, generator=gen) * 3
    old_values, returns = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    advantages = torch.randn(shape, generator=gen)
    n_tokens = mask.sum().item()

    def gradients(pieces: int, per_micro_mean: bool = False) -> list[torch.Tensor]:
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_pretrained(sft)
        head = torch.nn.Linear(policy.config.hidden_size, 1, bias=False) if critic == "shared" else None
        actor = PolicyValue(policy, head).eval()
        critic_model = load_reward_model(rm, 0).eval() if critic == "separate" else None
        accelerator = SimpleNamespace(
            backward=lambda loss: loss.backward(), distributed_type=DistributedType.NO
        )
        for k, rows in enumerate(torch.arange(8).tensor_split(pieces)):
            _micro_step(
                cfg,
                actor,
                critic_model,
                batch.select(rows),
                old_logp[rows],
                ref_logp[rows],
                old_values[rows],
                returns[rows],
                advantages[rows],
                mask[rows],
                mask[rows].sum().item() if per_micro_mean else n_tokens,
                0.1,
                accelerator,
                None,
                0.0,
                last=k == pieces - 1,
            )
        params = list(actor.parameters()) + (list(critic_model.parameters()) if critic_model else [])
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    whole, accumulated = gradients(1), gradients(4)
    assert any(g.abs().sum() > 0 for g in whole)
    for a, b in zip(whole, accumulated, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # The check has teeth: each micro-batch averaged over its own tokens (the usual bug) differs.
    per_micro = gradients(4, per_micro_mean=True)
    assert not all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(whole, per_micro, strict=True))


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule_warms_up_then_decays_to_its_end(schedule):
    """ppo.warmup_steps warms every ppo.lr_schedule up linearly from 0 (constant too), then decays."""
    from rlhfkit.train.loop import make_optimizer

    total, warmup = 10, 4
    optimizer, scheduler = make_optimizer(
        [torch.nn.Parameter(torch.zeros(1))], 1.0, total, warmup, schedule=schedule
    )
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[: warmup + 1] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    after = [(total - s) / (total - warmup) for s in range(warmup, total + 1)]
    expected = {
        "linear": after,
        "cosine": [0.5 * (1 + math.cos(math.pi * (1 - a))) for a in after],
        "constant": [1.0] * len(after),
    }[schedule]
    assert lrs[warmup:] == pytest.approx(expected, abs=1e-12)


def test_freeze_layers_freezes_gpt2s_learned_positions_with_the_lower_blocks():
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    model = tiny_causal_lm(tokenizer, "gpt2", 16, 2, 2, 32, max_positions=32)
    freeze_lower_layers(model, 1)
    blocks = decoder_blocks(model)
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters())
    # wpe feeds only the frozen bottom of the network; wte stays trainable as the tied LM head.
    assert not model.transformer.wpe.weight.requires_grad
    assert model.transformer.wte.weight.requires_grad
    untied = tiny_causal_lm(tokenizer, "gpt2", 16, 2, 2, 32, max_positions=32)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    freeze_lower_layers(untied, 1)
    assert not untied.transformer.wpe.weight.requires_grad
    assert not untied.transformer.wte.weight.requires_grad and untied.lm_head.weight.requires_grad
    # Rotary positions have no table: Llama's blocks and untied embeddings freeze as before.
    llama = tiny_causal_lm(tokenizer, "llama", 16, 2, 2, 32)
    freeze_lower_layers(llama, 1)
    assert not any(p.requires_grad for p in decoder_blocks(llama)[0].parameters())


def test_bad_switches_are_config_errors():
    from rlhfkit.config import ConfigError

    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(overrides=["ppo.minibatch=16", "ppo.grad_accum=3"])
    with pytest.raises(ConfigError, match="ppo.dual_clip"):
        load_config(overrides=["ppo.dual_clip=0.5"])
    with pytest.raises(ConfigError, match="ppo.kl_mode"):
        load_config(overrides=["ppo.kl_mode=sometimes"])
    # As a loss, k1's expected gradient is zero (E_pi[grad log pi] = 0): refused, naming the fix.
    with pytest.raises(ConfigError, match="kl_mode 'loss' needs kl_estimator k2 .* or k3"):
        load_config(overrides=["ppo.kl_mode=loss"])
    assert load_config(overrides=["ppo.kl_mode=loss", "ppo.kl_estimator=k2"]).ppo.kl_estimator == "k2"


def _run_dir(tmp_path: Path, name: str, models: tuple[Path, Path]) -> Path:
    run = tmp_path / name
    shutil.copytree(models[0], run / "sft" / "model")
    shutil.copytree(models[1], run / "rm" / "model")
    return run


def _ppo_command(run: Path, *extra: str) -> list[str]:
    sets = SMALL[1:] + ["ppo.steps=6", "ppo.save_every=2", "data.task=colours_task"]
    return [
        sys.executable,
        "-m",
        "rlhfkit",
        "ppo",
        "--out",
        str(run),
        "--no-progress",
        *[arg for s in sets for arg in ("--set", s)],
        *extra,
    ]


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "colours_task.py").write_text(TASK_MODULE)
    return {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{metrics} never reached {n} steps")


@pytest.mark.slow
def test_killed_run_resumes_to_bit_identical_weights(models, tmp_path):
    env = _env(tmp_path)
    reference = _run_dir(tmp_path, "uninterrupted", models)
    done = subprocess.run(_ppo_command(reference), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    # SIGTERM: the run finishes its step, saves a checkpoint, says how to continue, exits 130.
    run = _run_dir(tmp_path, "interrupted", models)
    proc = subprocess.Popen(
        _ppo_command(run), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_steps(run / "ppo", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err
    stopped_at = len(_metrics(run / "ppo"))
    assert stopped_at < 6
    assert (run / "ppo" / "checkpoints" / f"step-{stopped_at}" / STATE_FILE).is_file()

    # SIGKILL (no chance to save): resume from the last periodic checkpoint instead.
    proc = subprocess.Popen(
        _ppo_command(run, "--resume"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_steps(run / "ppo", 5, proc)
    proc.kill()
    proc.communicate(timeout=60)

    resumed = subprocess.run(
        _ppo_command(run, "--resume"), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout

    expected = (reference / "ppo" / "model" / "model.safetensors").read_bytes()
    assert (run / "ppo" / "model" / "model.safetensors").read_bytes() == expected
    rows, ref_rows = _metrics(run / "ppo"), _metrics(reference / "ppo")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["reward/score"] for r in rows] == [r["reward/score"] for r in ref_rows]
    # Only the newest checkpoint keeps optimiser state; older ones keep weights for sweeps.
    states = [p for _, p in checkpoint_steps(run / "ppo" / "checkpoints") if (p / STATE_FILE).is_file()]
    assert [p.name for p in states] == ["step-6"]

    # A checkpoint made with another config is refused, not silently mixed in.
    changed = subprocess.run(
        _ppo_command(run, "--resume", "--set", "ppo.kl_coef=0.3"), env=env, capture_output=True, text=True
    )
    assert changed.returncode == 2
    assert "different config" in changed.stderr


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_reference_runs_in_the_policys_precision(models, tmp_path, lora):
    """Under mixed precision the policy's prepared forward autocasts; the reference must too, or the
    KL of the first rollout (policy = reference) is not 0 and its estimate can go negative."""
    from rlhfkit.train.grpo import run_critic_free
    from rlhfkit.train.rewards import build_reward_functions

    sft, rm = models
    common = ["model.dtype=bfloat16", f"lora.enabled={str(lora).lower()}"]
    cfg = load_config(overrides=[*SMALL, *common, "ppo.steps=1"])
    run_ppo(cfg, sft, rm, PROMPTS, tmp_path / "ppo", show_progress=False)
    assert _metrics(tmp_path / "ppo")[0]["kl"] == 0.0
    grpo = load_config(
        overrides=[
            *common,
            "grpo.steps=1",
            "grpo.prompts_per_step=2",
            "grpo.group_size=2",
            "grpo.minibatch=4",
            "grpo.max_new_tokens=6",
            "grpo.update_epochs=1",
        ]
    )
    terms = build_reward_functions(grpo.grpo.rewards, rm)
    run_critic_free(grpo, "grpo", sft, terms, PROMPTS, tmp_path / "grpo", show_progress=False)
    assert _metrics(tmp_path / "grpo")[0]["kl"] == 0.0
