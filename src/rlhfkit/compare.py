"""`rlhfkit compare`: every method from the same SFT model and feedback, one judge, one table.

The demo's stages up to the reward model run once (finished ones are reused); each method
then trains from `RUN/sft/model` on the same pairs / reward model, and all trained policies
are sampled on the same held-out prompts with the same seed by `evaluate_policies`
(AlpacaFarm-style: win rate against SFT under the gold judge, with a 95% interval).
Best-of-n has no weights; its row comes from the `bon` stage, which judges it on the same
prompts with the SFT sample of each prompt as the paired baseline and the analytic KL.
"""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from rlhfkit.pipeline import STAGES, Run, _prompts, resolve_gold, run_stage

ALGOS = ("sft", "bon", "expert_iter", "ppo", "dpo", "kto", "grpo", "rloo")


def parse_algos(text: str) -> list[str]:
    """'sft,dpo,grpo' -> ["sft", "dpo", "grpo"]; SFT (the reference) is always first."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in ALGOS]
    if unknown:
        raise ValueError(f"--algos: unknown method(s) {', '.join(unknown)} (choose from {', '.join(ALGOS)})")
    return list(dict.fromkeys(["sft", *names]))


def run_compare(run: Run, algos: list[str]) -> dict[str, Any]:
    """Train (or reuse) each method, judge all against SFT, write RUN/compare.json."""
    from rlhfkit.eval.evaluate import evaluate_policies

    upstream = list(STAGES[: STAGES.index("rm") + 1])
    if run.config.model.name_or_path:
        upstream.remove("pretrain")
    for stage in upstream:
        run_stage(run, stage, reuse=True)
    summaries = {name: run_stage(run, name, reuse=True) for name in algos if name != "sft"}
    summaries["sft"] = json.loads((run.stage_dir("sft") / "summary.json").read_text())

    ev = run.config.eval
    prompts = _prompts(run.config.data.heldout_prompts, run.task.heldout_prompts)[: ev.n_prompts]
    gold = resolve_gold(run.task) if run.task.gold else None
    policies = {name: run.model_path(name) for name in algos if name != "bon"}
    result = evaluate_policies(
        policies,
        "sft",
        run.model_path("rm"),
        prompts,
        gold,
        seed=run.config.seed,
        temperature=ev.temperature,
        max_new_tokens=ev.max_new_tokens,
        n_samples=0,
        judge="gold" if gold is not None else "rm",
        ci_method=ev.ci_method,
    )["eval"]
    rows: dict[str, dict[str, Any]] = {}
    for name in algos:
        if name == "bon":
            s = summaries["bon"]
            rows[name] = {
                "gold_reward": s.get("gold_reward"),
                "proxy_reward": s.get("proxy_reward"),
                "kl_from_sft": s["kl_analytic"],
                "kl_kind": f"analytic bound log n - (n-1)/n, n={s['n']}",
                "win_rate_vs_sft": s.get("win_rate_vs_sft"),
            }
        else:
            entry = result["policies"][name]
            rows[name] = {
                "gold_reward": entry.get("gold_reward"),
                "proxy_reward": entry.get("proxy_reward"),
                "kl_from_sft": entry.get("kl_from_sft"),
                "kl_kind": "sampled, k1 summed over tokens",
                "win_rate_vs_sft": result["win_rate_vs_sft"].get(name),
            }
        rows[name]["wall_seconds"] = summaries[name].get("wall_seconds")
    out = {
        "task": run.task.name,
        "seed": run.config.seed,
        "judge": result["judge"],
        "n_prompts": len(prompts),
        "temperature": ev.temperature,
        "algos": algos,
        "policies": rows,
        "stages": {name: {k: v for k, v in s.items() if k != "fingerprint"} for name, s in summaries.items()},
    }
    (run.dir / "compare.json").write_text(json.dumps(out, indent=2))
    return out


def _number(value: Any, fmt: str = ".3f") -> str:
    return "-" if value is None else format(float(value), fmt)


def compare_table(result: dict[str, Any]) -> Table:
    """The comparison as a rich table: one row per method, SFT first."""
    table = Table(
        title=f"Methods vs SFT on {result['n_prompts']} held-out prompts (judge: {result['judge']})",
        title_justify="left",
    )
    for column in (
        "method",
        "win rate vs SFT [95% CI]",
        "gold reward",
        "proxy reward",
        "KL from SFT",
        "wall s",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, row in result["policies"].items():
        win = row.get("win_rate_vs_sft")
        win_text = "-" if not win else f"{win['rate']:.2f} [{win['ci95'][0]:.2f}, {win['ci95'][1]:.2f}]"
        kl = _number(row.get("kl_from_sft")) + ("*" if row["kl_kind"].startswith("analytic") else "")
        table.add_row(
            name,
            win_text,
            _number(row.get("gold_reward")),
            _number(row.get("proxy_reward")),
            kl,
            _number(row.get("wall_seconds"), ".0f"),
        )
    table.caption = "* best-of-n: analytic KL bound log n - (n-1)/n; others: sampled KL estimate"
    return table
