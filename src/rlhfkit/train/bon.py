"""Best-of-n sampling, and expert iteration (rejection-sampling fine-tuning) built on it.

Best-of-n is a policy without training: sample n responses, keep the one the reward
terms score highest. Its KL from the sampling policy is at most log n - (n - 1) / n
(`rlhfkit.algos.bon.best_of_n_kl`). Expert iteration turns the kept responses into new
demonstrations and fine-tunes on them with the SFT loop, for a few rounds.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from rlhfkit.algos.bon import best_of_n_kl
from rlhfkit.config import RolloutConfig, RunConfig, SFTConfig
from rlhfkit.data.io import write_jsonl
from rlhfkit.models.loading import check_prompt_room, load_causal_lm, load_tokenizer, position_table
from rlhfkit.models.tokenizer import prompt_token_ids
from rlhfkit.rollout import make_sampler
from rlhfkit.train.loop import MetricsLog, Stopwatch
from rlhfkit.train.rewards import RewardTerm, combined_rewards
from rlhfkit.train.sft import run_sft


@torch.no_grad()
def sample_best_of_n(
    policy_path: Path | str,
    prompts: list,
    reward_terms: list[RewardTerm],
    n: int,
    *,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    rollout: RolloutConfig | None = None,
    max_new_tokens_key: str = "eval.max_new_tokens",
) -> dict:
    """n samples per prompt and the best under the rewards, sampled by `rollout.backend` (unset: hf).
    `max_new_tokens_key` names `max_new_tokens` in an error (prompt and response overrun the model).

    Returns {"candidates": [n][P] texts, "scores": [P][n], "best_index": [P], "best": [P] texts,
    "best_ids": [P] token ids}.
    Draw 0 is made right after seeding with `seed`, exactly as `evaluate_policies` samples a
    policy, so it *is* the plain policy's sample on the same prompts (hf backend with the default
    rollout.batch_size, the batch `evaluate_policies` samples in).
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    tokenizer = load_tokenizer(policy_path)
    check_prompt_room(position_table(policy_path), tokenizer, prompts, max_new_tokens_key, max_new_tokens)
    policy = load_causal_lm(policy_path).eval()
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    sample = make_sampler(rollout or RolloutConfig(), policy, tokenizer, seed=seed)
    torch.manual_seed(seed)
    candidates: list[list[str]] = []
    candidate_ids: list[list[list[int]]] = []
    for _ in range(n):
        responses = sample(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature)
        candidate_ids.append(responses)
        candidates.append(tokenizer.batch_decode(responses, skip_special_tokens=True))
    flat_prompts = [p for _ in range(n) for p in prompts]
    flat, _ = combined_rewards(reward_terms, flat_prompts, [t for draw in candidates for t in draw])
    # float64, the rewards' own precision: float32 would round rewards that differ by less than
    # its resolution (about 1e-7 relative) into ties, and the earliest of them would be kept.
    scores = torch.tensor(flat, dtype=torch.float64).view(n, len(prompts)).T  # [P, n]
    # argmax takes the first maximum: ties go to the earliest draw, deterministically.
    best_index = scores.argmax(dim=1).tolist()
    return {
        "candidates": candidates,
        "scores": scores.tolist(),
        "best_index": best_index,
        "best": [candidates[k][i] for i, k in enumerate(best_index)],
        "best_ids": [candidate_ids[k][i] for i, k in enumerate(best_index)],
    }


def write_best_of_n_samples(path: Path, prompts: list, result: dict) -> int:
    """One JSON line per prompt: the kept response, its index, every candidate and its score."""
    rows = (
        {
            "prompt": prompt,
            "best": result["best"][i],
            "best_index": result["best_index"][i],
            "candidates": [draw[i] for draw in result["candidates"]],
            "scores": [round(s, 4) for s in result["scores"][i]],
        }
        for i, prompt in enumerate(prompts)
    )
    return write_jsonl(path, rows)


def best_of_n_summary(result: dict, n: int) -> dict:
    """Reward of the kept responses vs draw 0 (the plain policy), and the analytic KL."""
    scores = torch.tensor(result["scores"], dtype=torch.float64)
    return {
        "n": n,
        "kl_analytic": round(best_of_n_kl(n), 4),
        "reward_best": round(scores.max(dim=1).values.mean().item(), 4),
        "reward_single": round(scores[:, 0].mean().item(), 4),
    }


def run_expert_iteration(
    config: RunConfig,
    policy_path: Path | str,
    reward_terms: list[RewardTerm],
    prompts: list,
    out_dir: Path,
    show_progress: bool = True,
) -> dict:
    """Rounds of: best-of-n on training prompts with the current policy, SFT on the winners."""
    cfg = config.expert_iter
    if not prompts:
        raise ValueError("expert_iter: no prompts to sample from")
    watch = Stopwatch()
    rng = random.Random(f"expert-iter-{config.seed}")
    sft_cfg = SFTConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, max_length=config.sft.max_length
    )
    round_config = config.model_copy(update={"sft": sft_cfg})
    current: Path | str = policy_path
    rows = []
    for k in range(1, cfg.rounds + 1):
        chosen = [prompts[rng.randrange(len(prompts))] for _ in range(cfg.n_prompts)]
        result = sample_best_of_n(
            current,
            chosen,
            reward_terms,
            cfg.n,
            seed=config.seed + k,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            rollout=config.rollout,
            max_new_tokens_key="expert_iter.max_new_tokens",
        )
        round_dir = out_dir / f"round{k}"
        write_best_of_n_samples(round_dir / "samples.jsonl", chosen, result)
        demos = [
            {"prompt": p, "completion": text}
            for p, text in zip(chosen, result["best"], strict=True)
            if text.strip()
        ]
        if not demos:
            raise ValueError(f"expert_iter round {k}: every best-of-{cfg.n} response was empty")
        sft_summary = run_sft(round_config, current, demos, round_dir, show_progress)
        current = round_dir / "model"
        row = {"round": k, **best_of_n_summary(result, cfg.n), "sft_loss": sft_summary["final_loss"]}
        row["n_demonstrations"] = len(demos)
        rows.append(row)
    if (out_dir / "model").exists():
        shutil.rmtree(out_dir / "model")
    shutil.copytree(current, out_dir / "model")
    log = MetricsLog(out_dir / "metrics.jsonl")
    for row in rows:
        log.log(row["round"], **{k: v for k, v in row.items() if k != "round"})
    log.close()
    return {
        "wall_seconds": watch.seconds(),
        "rounds": cfg.rounds,
        "n": cfg.n,
        "final_reward_best": rows[-1]["reward_best"],
        "final_reward_single": rows[-1]["reward_single"],
        "n_demonstrations": sum(r["n_demonstrations"] for r in rows),
    }
