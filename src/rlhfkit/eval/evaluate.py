"""Judge policies on held-out prompts: gold reward, proxy reward, KL, win rate, RM accuracy."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import torch

from rlhfkit.eval.metrics import text_metrics
from rlhfkit.eval.winrate import win_rate
from rlhfkit.models.heads import sequence_scores
from rlhfkit.models.loading import (
    check_prompt_room,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    position_table,
)
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
def sequence_logprobs(
    policy, prompt_ids, responses, pad_id: int, temperature: float = 1.0, batch_size: int = 64
) -> list[float]:
    """log pi(y|x) of each (prompt, response token ids), summed over the response."""
    out: list[float] = []
    for s in range(0, len(responses), batch_size):
        b = join_prompt_response(prompt_ids[s : s + batch_size], responses[s : s + batch_size], pad_id)
        lp = response_logprobs(policy, b.input_ids, b.attention_mask, b.n_response, temperature)
        out += (lp * b.response_mask).sum(1).tolist()
    return out


def sequence_kl(
    policy, reference, prompt_ids, responses, pad_id: int, temperature: float, batch_size: int = 64
) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) per sample: an unbiased estimate of KL(pi || pi_ref)."""
    lp, ref = (
        sequence_logprobs(m, prompt_ids, responses, pad_id, temperature, batch_size)
        for m in (policy, reference)
    )
    return [a - b for a, b in zip(lp, ref, strict=True)]


def _mean(xs: Sequence[float]) -> float:
    return round(sum(xs) / max(len(xs), 1), 4)


JUDGES = ("gold", "rm", "llm")


def evaluate_policies(
    policies: Mapping[str, Path],
    reference: str,
    reward_path: Path | None,
    prompts: list[str],
    gold: Utility | None,
    *,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    n_samples: int = 8,
    judge: str = "gold",
    references: Sequence[list[str]] | None = None,
    ci_method: str = "wilson",
    llm_judge: Callable[[Sequence[str], Sequence[str]], list[float]] | None = None,
) -> dict:
    """Sample every policy once per prompt and judge; win rates are against `reference`.

    `judge` decides the win rate: "gold" compares gold utilities, "rm" proxy rewards,
    "llm" the scores `llm_judge(prompts, responses)` (e.g. an LLMJudge) gives each response.
    `references[i]` lists reference answers of prompt i for ROUGE-L/BLEU (may be empty).
    A prompt and response that overrun a model's learned positions are an error naming
    eval.max_new_tokens, the key every caller takes `max_new_tokens` from.
    """
    if reference not in policies:
        raise ValueError(f"reference policy {reference!r} is not among the policies ({', '.join(policies)})")
    if judge not in JUDGES:
        raise ValueError(f"unknown judge {judge!r}; choose one of {', '.join(JUDGES)}")
    if judge == "gold" and gold is None:
        raise ValueError("judge 'gold' needs a task with a gold utility; use --judge rm or llm")
    if judge == "rm" and reward_path is None:
        raise ValueError("judge 'rm' needs a reward model")
    if judge == "llm" and llm_judge is None:
        raise ValueError("judge 'llm' needs an LLM judge")
    if not temperature > 0:
        # Greedy decoding has no density to take a KL of: the logits / 0 would make every KL NaN.
        raise ValueError(f"eval.temperature must be > 0 (the KL is taken at it), got {temperature}")
    tokenizer = load_tokenizer(policies[reference])
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    # Before any model loads: every model reads a prompt and its whole response.
    for path in [*policies.values(), *([reward_path] if reward_path is not None else [])]:
        check_prompt_room(position_table(path), tokenizer, prompts, "eval.max_new_tokens", max_new_tokens)
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    reward_model = load_reward_model(reward_path, pad).eval() if reward_path is not None else None
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
        kl = sequence_kl(model, ref_model, prompt_ids, responses, pad, temperature)
        entry: dict = {
            f"kl_from_{reference}": _mean(kl),
            "response_tokens": _mean([len(r) for r in responses]),
            **text_metrics(texts[name], references),
        }
        if reward_model is not None:
            entry["_proxy"] = score_with_reward_model(reward_model, prompt_ids, responses, pad)
            entry["proxy_reward"] = _mean(entry["_proxy"])
        if gold is not None:
            entry["_gold"] = [gold(p, t) for p, t in zip(prompts, texts[name], strict=True)]
            entry["gold_reward"] = _mean(entry["_gold"])
        if llm_judge is not None:
            entry["_llm"] = list(llm_judge(prompts, texts[name]))
            entry["llm_score"] = _mean(entry["_llm"])
        result[name] = entry
    report: dict = {
        "policies": {},
        "n_prompts": len(prompts),
        "reference": reference,
        "judge": judge,
        "kl_estimator": KL_ESTIMATOR_NAME,
        "temperature": temperature,
    }
    # Which reward model or LLM judged: "rm" or "llm" alone does not say.
    if judge == "rm":
        report["judge_model"] = str(reward_path)
    elif judge == "llm":
        report["judge_model"] = str(getattr(llm_judge, "name", None) or llm_judge)
    # Each judge scores every response on its own; a win is a higher score on the same prompt.
    key = {"gold": "_gold", "rm": "_proxy", "llm": "_llm"}[judge]
    report[f"win_rate_vs_{reference}"] = {
        name: win_rate(result[name][key], result[reference][key], method=ci_method, seed=seed)
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
                        "proxy": round(result[name]["_proxy"][i], 4) if reward_model is not None else None,
                    }
                    for name in policies
                },
            }
        )
    for name, entry in result.items():
        report["policies"][name] = {k: v for k, v in entry.items() if not k.startswith("_")}
    return {"eval": report, "samples": samples}


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


def resolve_policies(run_dir: Path, names: Sequence[str]) -> dict[str, Path]:
    """Policy name -> model folder: a stage of the run (RUN/<name>/model) or a model folder.

    With no names: sft first, then every other stage of the run with a saved model except
    the pretrained base and the reward model (and the checkpoints PPO keeps). A folder is
    named by `model_label`, or by its full path when two folders' labels are the same.
    """
    run_dir = Path(run_dir)
    if not names:
        saved = (
            sorted(p.name for p in run_dir.iterdir() if (p / "model" / "config.json").is_file())
            if run_dir.is_dir()
            else []
        )
        names = [n for n in ["sft", *saved] if n not in ("pretrain", "rm")]
        names = list(dict.fromkeys(names))
    found: list[tuple[str | None, Path]] = []  # (stage name, or None for a folder; model folder)
    for name in names:
        stage_model = run_dir / name / "model"
        folder = Path(name)
        if (stage_model / "config.json").is_file():
            found.append((name, stage_model))
        elif (folder / "config.json").is_file():
            found.append((None, folder))
        else:
            raise ValueError(
                f"policy {name!r}: neither {stage_model} nor {folder} holds a saved model (config.json)"
            )
    taken = {stage for stage, _ in found if stage is not None}
    labels = folder_labels([path for stage, path in found if stage is None], taken)
    out: dict[str, Path] = {}
    for stage, path in found:
        out.setdefault(stage if stage is not None else labels[path.resolve()], path)
    return out


def reference_policy(run_dir: Path, policies: Mapping[str, Path], reference: str) -> str:
    """The name `resolve_policies` gave the reference policy.

    `reference` may be that name, or the policy as eval.policies gives it: a stage of the run or
    a model folder (a path, as typed there). Anything else is returned as given, for
    `evaluate_policies` to refuse with the names it knows.
    """
    if reference in policies:
        return reference
    for folder in (Path(run_dir) / reference / "model", Path(reference)):
        if (folder / "config.json").is_file():
            for name, path in policies.items():
                if Path(path).resolve() == folder.resolve():
                    return name
    return reference


def task_topic_of(gold_spec: str | None) -> Callable[[str], object | None] | None:
    """The `topic_of(prompt)` function next to a task's gold utility, when the task has one."""
    if not gold_spec:
        return None
    import importlib

    module = importlib.import_module(gold_spec.partition(":")[0])
    return getattr(module, "topic_of", None)


def topic_references(
    prompts: Sequence[str], demonstrations: Sequence[Mapping[str, str]], topic_of: Callable[[str], object]
) -> list[list[str]]:
    """References of each prompt: the demonstrations written for the same topic (none for unseen topics)."""
    by_topic: dict[object, list[str]] = {}
    for demo in demonstrations:
        if isinstance(demo.get("prompt"), str):
            by_topic.setdefault(topic_of(demo["prompt"]), []).append(demo["completion"])
    by_topic.pop(None, None)
    return [by_topic.get(topic_of(p), []) if isinstance(p, str) else [] for p in prompts]


def file_references(path: Path, prompts: Sequence[str]) -> list[list[str]]:
    """References of each prompt from rows of {prompt, completion} (several rows per prompt allowed)."""
    from rlhfkit.data.io import read_records

    by_prompt: dict[str, list[str]] = {}
    for record in read_records(path, "demonstration"):
        prompt, completion = record.as_prompt_completion()
        if isinstance(prompt, str):
            by_prompt.setdefault(prompt, []).append(completion)
    return [by_prompt.get(p, []) if isinstance(p, str) else [] for p in prompts]


def load_llm_judge(model: str | None) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """The LLM judge (rlhfkit.eval.llm_judge.LLMJudge, yes/no mode) on the model at `model`."""
    if not model:
        raise ValueError("judge 'llm' needs a judge model: set eval.judge_model (a model folder or hub id)")
    from rlhfkit.eval.llm_judge import LLMJudge

    return LLMJudge(model)


def folder_labels(folders: Sequence[Path], taken: Collection[str] = ()) -> dict[Path, str]:
    """Resolved model folder -> its name: `model_label`, or its full path for every folder when
    two folders' labels are the same or one is a name in `taken` (the same folder twice is one)."""
    resolved = list(dict.fromkeys(Path(folder).resolve() for folder in folders))
    labels = {path: model_label(path) for path in resolved}
    # Two runs' checkpoints/step-20 must not replace each other: then every folder is its full path.
    if len(set(labels.values())) < len(labels) or set(taken) & set(labels.values()):
        labels = {path: str(path) for path in resolved}
    return labels


def model_label(folder: Path) -> str:
    """A short name for a model folder: its last two path parts, skipping a final "model".

    runs/a/ppo/checkpoints/step-40 -> "checkpoints/step-40"; runs/small/rm/model -> "small/rm".
    """
    parts = Path(folder).resolve().parts
    if parts and parts[-1] == "model":
        parts = parts[:-1]
    return "/".join(parts[-2:])
