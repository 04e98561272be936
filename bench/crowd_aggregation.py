"""Crowd aggregation experiment on the top-5 task (docs/crowd.md).

A pool of simulated annotators (default: crowd10, 10 annotators of whom 2 spam and 1
is adversarial) labels pairs of SFT samples through the feedback store. We measure:

1. how often each aggregation method recovers the gold preference, vs majority vote;
2. which annotators the quality check flags;
3. the held-out accuracy (on fresh gold-labelled pairs) of reward models trained on the
   raw per-annotator labels, on majority vote, and on Dawid-Skene (hard and soft labels);
4. a label-efficiency curve: held-out accuracy vs number of labels, raw vs Dawid-Skene.

The gold utility only simulates the annotators and judges; no model trains on it.
Usage: python bench/crowd_aggregation.py --run RUN [--out DIR]  (RUN/sft/model must exist).
Writes DIR/crowd.json (every number, the curve's data) and DIR/label_efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch

from rlhfkit.config import load_config
from rlhfkit.crowd.aggregate import aggregate, preference_rows
from rlhfkit.crowd.quality import annotator_quality, mace_spam_probability
from rlhfkit.crowd.simulate import load_pool, simulate_annotation
from rlhfkit.feedback.store import FeedbackStore
from rlhfkit.models.loading import load_causal_lm, load_reward_model, load_tokenizer
from rlhfkit.models.tokenizer import prompt_token_ids
from rlhfkit.rollout.generate import sample_texts
from rlhfkit.tasks import load_task, resolve_gold
from rlhfkit.train.rm import pair_accuracy, run_rm, tokenize_pairs

METHODS = ("mv", "wawa", "ds", "mace", "bt", "noisy_bt")


def sample_pairs(policy_path: Path, prompts: list[str], seed: int, max_new_tokens: int) -> list[tuple]:
    """(prompt, response a, response b) from two samples of the policy per prompt; identical ones dropped."""
    tokenizer, policy = load_tokenizer(policy_path), load_causal_lm(policy_path).eval()
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    torch.manual_seed(seed)
    with torch.no_grad():
        a, b = (sample_texts(policy, tokenizer, ids, max_new_tokens=max_new_tokens) for _ in range(2))
    return [(p, x, y) for p, x, y in zip(prompts, a, b, strict=True) if x != y]


def heldout_accuracy(rm_path: Path, rows: list, pad_id: int) -> float:
    """Share of gold-labelled held-out pairs the reward model orders like the gold judge."""
    model = load_reward_model(rm_path, pad_id).eval()
    return pair_accuracy(model, rows, pad_id, torch.device("cpu"))


def train_rm(config, sft: Path, pairs: list[dict], out: Path, heldout_rows, pad_id: int, soft: str) -> dict:
    """Train one reward model on `pairs` and judge it on the held-out pairs; keeps no weights."""
    cfg = config.model_copy(deep=True)
    cfg.rm.val_share = 0.0
    cfg.rm.soft_labels = soft
    summary = run_rm(cfg, sft, pairs, out, show_progress=False)
    accuracy = heldout_accuracy(out / "model", heldout_rows, pad_id)
    shutil.rmtree(out / "model")
    return {"n_pairs": len(pairs), "heldout_accuracy": round(accuracy, 4), "steps": summary["steps"]}


def main() -> None:
    """Run the experiment and write crowd.json and label_efficiency.png."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run directory with sft/model")
    parser.add_argument("--out", type=Path, default=Path("runs/crowd-bench"))
    parser.add_argument("--pool", default="crowd10", help="shipped pool name or pool YAML")
    parser.add_argument("--items", type=int, default=600, help="comparison items")
    parser.add_argument("--overlap", type=int, default=3, help="annotators per item")
    parser.add_argument("--heldout", type=int, default=400, help="held-out prompts (two samples each)")
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--curve", default="0.25,0.5,1.0", help="shares of the items for the curve")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sft = args.run / "sft" / "model"
    if not (sft / "config.json").is_file():
        sys.exit(f"error: {sft} has no model: run `rlhfkit demo --preset fast --out {args.run}` first")
    config = load_config(None, [], "fast")
    config.seed = args.seed
    args.out.mkdir(parents=True, exist_ok=True)
    task = load_task("top5", args.seed)
    gold = resolve_gold(task)
    rng = random.Random(f"crowd-bench-{args.seed}")
    prompts = [task.train_prompts[rng.randrange(len(task.train_prompts))] for _ in range(args.items)]
    train_pairs = sample_pairs(sft, prompts, args.seed, config.feedback.max_new_tokens)
    held = sample_pairs(
        sft, task.heldout_prompts[: args.heldout], args.seed + 1, config.feedback.max_new_tokens
    )
    # Held-out pairs the gold judge separates, chosen first: the judge's answer key.
    heldout = []
    for p, x, y in held:
        gx, gy = gold(p, x), gold(p, y)
        if abs(gx - gy) > 1e-9:
            heldout.append({"prompt": p, "chosen": x if gx > gy else y, "rejected": y if gx > gy else x})
    tokenizer = load_tokenizer(sft)
    heldout_rows = tokenize_pairs(tokenizer, heldout, config.rm.max_length)
    print(f"{len(train_pairs)} comparison items, {len(heldout)} gold-labelled held-out pairs", flush=True)

    db = args.out / "feedback.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    pool = load_pool(args.pool)
    with FeedbackStore(db, seed=args.seed, durable=False) as store:
        project = store.create_project("crowd-bench", task_type="comparison", overlap=args.overlap)
        store.add_items(project, [{"prompt": p, "responses": [x, y]} for p, x, y in train_pairs])
        simulate_annotation(store, project, pool, gold, seed=args.seed)
        labels = store.labels(project)
        items = {item.item_id: item for item in store.items(project)}
    gold_winner = {}
    for item_id, item in items.items():
        g0, g1 = (gold(item.prompt, r) for r in item.responses)
        if abs(g0 - g1) > 1e-9:
            gold_winner[item_id] = 0 if g0 > g1 else 1
    print(f"{len(labels)} labels; {len(gold_winner)} items with a gold preference", flush=True)

    recovery = {}
    aggregates = {}
    for method in METHODS:
        aggregates[method] = aggregate(labels, method, seed=args.seed)
        right = sum(aggregates[method][i].winner == w for i, w in gold_winner.items())
        recovery[method] = {"recovered": right, "share": round(right / len(gold_winner), 4)}
        print(
            f"gold recovery {method}: {right}/{len(gold_winner)} = {right / len(gold_winner):.3f}", flush=True
        )
    raw_right = sum(lb.chosen == gold_winner[lb.item_id] for lb in labels if lb.item_id in gold_winner)
    raw_n = sum(lb.item_id in gold_winner for lb in labels)
    recovery["single_label"] = {"recovered": raw_right, "share": round(raw_right / raw_n, 4), "n": raw_n}

    spam = mace_spam_probability(labels, seed=args.seed)
    quality = annotator_quality(labels, aggregates["ds"], spam, args.threshold)
    kinds = {p.name: p.kind for p in pool}
    flagged = [q.annotator for q in quality if q.flagged]
    bad = sorted(p.name for p in pool if p.kind in ("spammer", "adversarial"))
    print(f"flagged: {flagged}; spammers and adversary: {bad}", flush=True)

    def raw_pairs(subset: set[int]) -> list[dict]:
        out = []
        for lb in labels:
            if lb.item_id in subset and lb.chosen is not None:
                item = items[lb.item_id]
                out.append(
                    {
                        "prompt": item.prompt,
                        "chosen": item.responses[lb.chosen],
                        "rejected": item.responses[1 - lb.chosen],
                    }
                )
        return out

    def aggregated_pairs(subset: set[int], method: str) -> list[dict]:
        if subset == set(items):
            return preference_rows(items, aggregates[method], "bench", method)
        sub_labels = [lb for lb in labels if lb.item_id in subset]
        return preference_rows(items, aggregate(sub_labels, method, seed=args.seed), "bench", method)

    all_items = set(items)
    rm_results = {}
    work = args.out / "rm-work"
    for name, pairs, soft in (
        ("raw", raw_pairs(all_items), "none"),
        ("mv", aggregated_pairs(all_items, "mv"), "none"),
        ("ds", aggregated_pairs(all_items, "ds"), "none"),
        ("ds_smoothing", aggregated_pairs(all_items, "ds"), "smoothing"),
    ):
        rm_results[name] = train_rm(config, sft, pairs, work, heldout_rows, tokenizer.pad_token_id, soft)
        print(f"RM on {name}: {rm_results[name]}", flush=True)

    order = sorted(items)
    random.Random(f"curve-{args.seed}").shuffle(order)
    curve = {"n_labels": [], "raw": [], "ds": []}
    for share in (float(s) for s in args.curve.split(",")):
        subset = set(order[: max(1, round(share * len(order)))])
        n_labels = sum(lb.item_id in subset for lb in labels)
        if share == 1.0:
            raw_acc, ds_acc = rm_results["raw"]["heldout_accuracy"], rm_results["ds"]["heldout_accuracy"]
        else:
            raw_acc = train_rm(
                config, sft, raw_pairs(subset), work, heldout_rows, tokenizer.pad_token_id, "none"
            )
            ds_acc = train_rm(
                config,
                sft,
                aggregated_pairs(subset, "ds"),
                work,
                heldout_rows,
                tokenizer.pad_token_id,
                "none",
            )
            raw_acc, ds_acc = raw_acc["heldout_accuracy"], ds_acc["heldout_accuracy"]
        curve["n_labels"].append(n_labels)
        curve["raw"].append(raw_acc)
        curve["ds"].append(ds_acc)
        print(f"curve: {n_labels} labels: raw {raw_acc:.3f}, ds {ds_acc:.3f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    result = {
        "pool": args.pool,
        "seed": args.seed,
        "n_items": len(items),
        "n_labels": len(labels),
        "n_gold_items": len(gold_winner),
        "n_heldout_pairs": len(heldout),
        "gold_recovery": recovery,
        "quality": [
            {
                "annotator": q.annotator,
                "kind": kinds.get(q.annotator),
                "skill": None if q.skill is None else round(q.skill, 4),
                "left_share": None if q.left_share is None else round(q.left_share, 4),
                "spam_probability": None if q.spam_probability is None else round(q.spam_probability, 4),
                "flags": list(q.flags),
            }
            for q in quality
        ],
        "flagged": flagged,
        "spammers_and_adversaries": bad,
        "reward_models": rm_results,
        "label_efficiency": curve,
    }
    (args.out / "crowd.json").write_text(json.dumps(result, indent=2))
    plot_curve(curve, args.out / "label_efficiency.png")
    print(f"wrote {args.out / 'crowd.json'} and {args.out / 'label_efficiency.png'}")


def plot_curve(curve: dict, path: Path) -> None:
    """Held-out RM accuracy vs number of labels, raw labels vs Dawid-Skene."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve["n_labels"], curve["raw"], marker="o", label="raw labels (one pair per label)")
    ax.plot(curve["n_labels"], curve["ds"], marker="s", label="Dawid-Skene (one pair per item)")
    ax.set_xlabel("labels collected")
    ax.set_ylabel("RM accuracy on gold held-out pairs")
    ax.set_title("Label efficiency (crowd10 pool)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
