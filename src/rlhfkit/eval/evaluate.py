"""Judge policies on held-out prompts: gold reward, proxy reward, KL, win rate, RM accuracy."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from rlhfkit.eval.winrate import win_rate
from rlhfkit.models.heads import sequence_scores
from rlhfkit.models.loading import load_causal_lm, load_reward_model, load_tokenizer
from rlhfkit.models.tokenizer import prompt_token_ids
from rlhfkit.rollout.batch import join_prompt_response
from rlhfkit.rollout.generate import sample_responses
from rlhfkit.rollout.logprobs import response_logprobs

Utility = Callable[[str, str], float]

KL_ESTIMATOR_NAME = "k1 summed over response tokens, on samples from the policy"


@torch.no_grad()
def score_with_reward_model(
    reward_model, prompt_ids, responses, pad_id: int, batch_size: int = 64
) -> list[float]:
    """Reward-model score of each (prompt, response token ids)."""
    out: list[float] = []
    for s in range(0, len(responses), batch_size):
        b = join_prompt_response(prompt_ids[s : s + batch_size], responses[s : s + batch_size], pad_id)
        out += sequence_scores(reward_model, b.input_ids, b.attention_mask).tolist()
    return out


@torch.no_grad()
def sequence_kl(
    policy, reference, prompt_ids, responses, pad_id: int, temperature: float, batch_size: int = 64
) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) per sample: an unbiased estimate of KL(pi || pi_ref)."""
    out: list[float] = []
    for s in range(0, len(responses), batch_size):
        b = join_prompt_response(prompt_ids[s : s + batch_size], responses[s : s + batch_size], pad_id)
        lp = response_logprobs(policy, b.input_ids, b.attention_mask, b.n_response, temperature)
        ref = response_logprobs(reference, b.input_ids, b.attention_mask, b.n_response, temperature)
        out += ((lp - ref) * b.response_mask).sum(1).tolist()
    return out


def _mean(xs: Sequence[float]) -> float:
    return round(sum(xs) / max(len(xs), 1), 4)


def evaluate_policies(
    policies: Mapping[str, Path],
    reference: str,
    reward_path: Path,
    prompts: list[str],
    gold: Utility | None,
    *,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    n_samples: int = 8,
) -> dict:
    """Sample every policy once per prompt and judge; win rates are against `reference`."""
    tokenizer = load_tokenizer(policies[reference])
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    reward_model = load_reward_model(reward_path, pad).eval()
    ref_model = load_causal_lm(policies[reference]).eval()
    texts: dict[str, list[str]] = {}
    result: dict[str, dict] = {}
    for name, path in policies.items():
        model = ref_model if name == reference else load_causal_lm(path).eval()
        # The same seed for every policy: differences come from the policies, not the dice.
        torch.manual_seed(seed)
        responses = sample_responses(
            model,
            prompt_ids,
            eos_id=eos,
            pad_id=pad,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
        texts[name] = tokenizer.batch_decode(responses, skip_special_tokens=True)
        proxy = score_with_reward_model(reward_model, prompt_ids, responses, pad)
        kl = sequence_kl(model, ref_model, prompt_ids, responses, pad, temperature)
        entry = {
            "proxy_reward": _mean(proxy),
            f"kl_from_{reference}": _mean(kl),
            "response_tokens": _mean([len(r) for r in responses]),
        }
        if gold is not None:
            golds = [gold(p, t) for p, t in zip(prompts, texts[name], strict=True)]
            entry["gold_reward"] = _mean(golds)
            entry["_gold"] = golds
        entry["_proxy"] = proxy
        result[name] = entry
    report: dict = {
        "policies": {},
        "n_prompts": len(prompts),
        "kl_estimator": KL_ESTIMATOR_NAME,
        "temperature": temperature,
    }
    if gold is not None:
        report[f"win_rate_vs_{reference}"] = {
            name: win_rate(result[name]["_gold"], result[reference]["_gold"])
            for name in policies
            if name != reference
        }
    samples = []
    for i in range(min(n_samples, len(prompts))):
        samples.append(
            {
                "prompt": prompts[i],
                "outputs": {
                    name: {
                        "text": texts[name][i],
                        "gold": result[name]["_gold"][i] if gold is not None else None,
                        "proxy": round(result[name]["_proxy"][i], 4),
                    }
                    for name in policies
                },
            }
        )
    for name, entry in result.items():
        report["policies"][name] = {k: v for k, v in entry.items() if not k.startswith("_")}
    return {"eval": report, "samples": samples}


@torch.no_grad()
def reward_model_gold_accuracy(
    policy_path: Path,
    reward_path: Path,
    prompts: list[str],
    gold: Utility,
    *,
    n_pairs: int,
    seed: int,
    temperature: float,
    max_new_tokens: int,
) -> dict:
    """Accuracy of the RM on fresh pairs from the policy, labelled by the gold utility.

    Two samples per held-out prompt; pairs the gold judge scores equal are dropped, since
    neither answer is right.
    """
    tokenizer = load_tokenizer(policy_path)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    policy = load_causal_lm(policy_path).eval()
    reward_model = load_reward_model(reward_path, pad).eval()
    chosen_prompts = [prompts[i % len(prompts)] for i in range(n_pairs)]
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in chosen_prompts]
    torch.manual_seed(seed + 1)
    a = sample_responses(
        policy,
        prompt_ids,
        eos_id=eos,
        pad_id=pad,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    b = sample_responses(
        policy,
        prompt_ids,
        eos_id=eos,
        pad_id=pad,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    sa, sb = (score_with_reward_model(reward_model, prompt_ids, r, pad) for r in (a, b))
    ta, tb = (
        tokenizer.batch_decode(a, skip_special_tokens=True),
        tokenizer.batch_decode(b, skip_special_tokens=True),
    )
    correct = n = 0
    for p, x, y, rx, ry in zip(chosen_prompts, ta, tb, sa, sb, strict=True):
        gx, gy = gold(p, x), gold(p, y)
        if abs(gx - gy) < 1e-9:
            continue
        n += 1
        correct += (rx > ry) == (gx > gy)
    return {"heldout_accuracy": round(correct / n, 4) if n else None, "n_heldout_pairs": n}


def label_gold_agreement(pairs: Sequence[Mapping[str, str]], gold: Utility) -> float | None:
    """Share of training pairs whose chosen response the gold judge also prefers (ties skipped)."""
    agree = n = 0
    for pair in pairs:
        gc, gr = gold(pair["prompt"], pair["chosen"]), gold(pair["prompt"], pair["rejected"])
        if abs(gc - gr) < 1e-9:
            continue
        n += 1
        agree += gc > gr
    return round(agree / n, 4) if n else None
