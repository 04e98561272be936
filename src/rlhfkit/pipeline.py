"""Stage orchestration over a run directory, with finished stages reused.

A stage is reused when `RUN/<stage>/summary.json` exists and was made from the same
config sections (its own and every upstream stage's); otherwise it runs again, and so
does everything downstream of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from rlhfkit.config import RunConfig, dump_config
from rlhfkit.data.io import read_records, write_jsonl
from rlhfkit.tasks import Task, load_task, resolve_gold
from rlhfkit.train.loop import Stopwatch

STAGES = ("pretrain", "sft", "feedback", "rm", "ppo", "eval")
# Config sections each stage reads; a stage also depends on everything before it.
_SECTIONS = {
    "pretrain": ("seed", "model", "data", "pretrain"),
    "sft": ("sft",),
    "feedback": ("feedback",),
    "rm": ("rm",),
    "ppo": ("ppo",),
    "eval": ("eval",),
}

console = Console()


class StageError(RuntimeError):
    """A stage cannot run: a missing upstream artifact or unusable input."""


class Run:
    """A run directory and the config it runs with."""

    def __init__(self, out: Path, config: RunConfig, show_progress: bool = True):
        self.dir = Path(out)
        self.config = config
        self.show_progress = show_progress
        self._task: Task | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")

    @property
    def task(self) -> Task:
        if self._task is None:
            self._task = load_task(self.config.data.task, self.config.seed)
        return self._task

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def model_path(self, stage: str) -> Path:
        """The saved model of an upstream stage; an error telling what to run if it is missing."""
        path = self.stage_dir(stage) / "model"
        if not (path / "config.json").is_file():
            raise StageError(
                f"{path} has no model: run `rlhfkit {stage} --out {self.dir}` first (or `rlhfkit demo`)"
            )
        return path

    def fingerprint(self, stage: str) -> str:
        cfg = self.config.model_dump(mode="json")
        sections: list[str] = []
        for s in STAGES[: STAGES.index(stage) + 1]:
            sections += _SECTIONS[s]
        blob = json.dumps({k: cfg[k] for k in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def finished(self, stage: str) -> bool:
        summary = self.stage_dir(stage) / "summary.json"
        if not summary.is_file():
            return False
        return json.loads(summary.read_text()).get("fingerprint") == self.fingerprint(stage)

    def read_report(self) -> dict[str, Any]:
        path = self.dir / "report.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_report(self, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge `patch` into report.json (written atomically, so a crash never leaves half a file)."""
        report = self.read_report()
        report.setdefault("task", self.task.name)
        report["seed"] = self.config.seed
        for key, value in patch.items():
            if isinstance(value, dict) and isinstance(report.get(key), dict):
                report[key].update(value)
            else:
                report[key] = value
        report["wall_seconds"] = round(
            sum(s.get("wall_seconds", 0.0) for s in report.get("stages", {}).values()), 2
        )
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, self.dir / "report.json")
        return report


def _prompts(path: Path | None, fallback: list[str]) -> list[str]:
    if path is None:
        return fallback
    return [_as_text(r.prompt) for r in read_records(path, "prompt")]


def _as_text(value: Any) -> Any:
    """Chat messages stay as message dicts (the chat template renders them); strings as is."""
    return value if isinstance(value, str) else [m.model_dump() for m in value]


def _completion_text(value: Any) -> str:
    return value if isinstance(value, str) else value[-1].content


def _preference_path(run: Run) -> Path:
    """data.preferences if set, else the pairs the feedback stage exported."""
    return Path(run.config.data.preferences or run.stage_dir("feedback") / "pairs.jsonl")


def _read_pairs(path: Path) -> list[dict]:
    """Validated preference pairs as {prompt, chosen, rejected} with plain-text completions."""
    return [
        {
            "prompt": _as_text(r.prompt),
            "chosen": _completion_text(r.chosen),
            "rejected": _completion_text(r.rejected),
        }
        for r in read_records(path, "preference")
    ]


def stage_pretrain(run: Run) -> dict:
    from rlhfkit.train.pretrain import run_pretrain

    if run.config.model.name_or_path:
        raise StageError("model.name_or_path is set: there is nothing to pretrain, start at `sft`")
    if not run.task.corpus:
        raise StageError(f"task {run.task.name!r} has no pretraining corpus; set model.name_or_path")
    return run_pretrain(run.config, run.task.corpus, run.stage_dir("pretrain"), run.show_progress)


def stage_sft(run: Run) -> dict:
    from rlhfkit.train.sft import run_sft

    init = run.config.model.name_or_path or run.model_path("pretrain")
    if run.config.data.demonstrations:
        demos = []
        for record in read_records(run.config.data.demonstrations, "demonstration"):
            prompt, completion = record.as_prompt_completion()
            demos.append({"prompt": _as_text(prompt), "completion": completion})
    else:
        demos = run.task.demonstrations
    if not demos:
        raise StageError("no demonstrations: set data.demonstrations to a JSONL file")
    return run_sft(run.config, init, demos, run.stage_dir("sft"), run.show_progress)


def stage_feedback(run: Run) -> dict:
    """Sample from the SFT policy, collect simulated comparisons in the store, export pairs."""
    from rlhfkit.crowd.agreement import krippendorff_alpha_nominal
    from rlhfkit.crowd.simulate import default_pool, simulate_annotation
    from rlhfkit.feedback.store import FeedbackStore
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.tokenizer import prompt_token_ids
    from rlhfkit.rollout.generate import sample_responses

    cfg, watch = run.config.feedback, Stopwatch()
    out = run.stage_dir("feedback")
    out.mkdir(parents=True, exist_ok=True)
    # Seeded: the left/right order shown to annotators is part of what makes a run reproducible.
    # Not fsynced per label: simulated labels survive a crash of the process, which is enough for
    # labels that can be simulated again; a human-facing server keeps the durable default.
    store = FeedbackStore(
        cfg.db or f"sqlite:///{(run.dir / 'feedback.db').resolve()}", seed=run.config.seed, durable=False
    )
    try:
        project = store.create_project(
            f"{cfg.project}-{run.fingerprint('feedback')[:8]}", task_type="comparison", overlap=1
        )
        # A project that already has items was interrupted: keep its labels, label the rest.
        if not store.items(project):
            rng = random.Random(f"feedback-{run.config.seed}")
            pool = _prompts(run.config.data.prompts, run.task.train_prompts)
            prompts = [
                pool[i % len(pool)] for i in rng.sample(range(max(cfg.n_prompts, len(pool))), cfg.n_prompts)
            ]
            policy_path = run.model_path("sft")
            tokenizer, policy = load_tokenizer(policy_path), load_causal_lm(policy_path)
            ids = [prompt_token_ids(tokenizer, p) for p in prompts]
            torch.manual_seed(run.config.seed)
            samples = [
                tokenizer.batch_decode(
                    sample_responses(
                        policy,
                        ids,
                        eos_id=tokenizer.eos_token_id,
                        pad_id=tokenizer.pad_token_id,
                        max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature,
                    ),
                    skip_special_tokens=True,
                )
                for _ in range(cfg.completions_per_prompt)
            ]
            items = []
            for i, prompt in enumerate(prompts):
                responses = [s[i] for s in samples]
                if len(set(responses)) < 2:
                    continue  # identical samples: nothing to compare
                items.append(
                    {
                        "prompt": prompt,
                        "responses": responses[:2],
                        "overlap": cfg.overlap if rng.random() < cfg.overlap_share else 1,
                        "meta": {"policy": "sft"},
                    }
                )
            store.add_items(project, items)
        gold = resolve_gold(run.task)
        stats = simulate_annotation(store, project, default_pool(), gold, seed=run.config.seed)
        labels = store.labels(project)
        by_item: dict[int, list] = {}
        for label in labels:
            by_item.setdefault(label.item_id, []).append("tie" if label.chosen is None else label.chosen)
        alpha = krippendorff_alpha_nominal(by_item)
        n_pairs = store.export_preferences(project, out / "pairs.jsonl")
        store.export_raw(project, out / "raw.jsonl")
        progress = store.progress(project)
    finally:
        store.close()
    return {
        "wall_seconds": watch.seconds(),
        "n_items": progress["n_items"],
        "n_labels": len(labels),
        "n_annotators": len({label.annotator for label in labels}),
        "n_pairs": n_pairs,
        "agreement_alpha": None if alpha is None else round(alpha, 4),
        "per_annotator": stats.get("per_annotator", {}),
    }


def stage_rm(run: Run) -> dict:
    from rlhfkit.train.rm import run_rm

    path = _preference_path(run)
    if not path.is_file() and run.config.data.preferences is None:
        raise StageError(
            f"{path} not found: run `rlhfkit feedback simulate --out {run.dir}` first or set data.preferences"
        )
    pairs = _read_pairs(path)
    return run_rm(run.config, run.model_path("sft"), pairs, run.stage_dir("rm"), run.show_progress)


def stage_ppo(run: Run) -> dict:
    from rlhfkit.train.ppo import run_ppo

    prompts = _prompts(run.config.data.prompts, run.task.train_prompts)
    return run_ppo(
        run.config,
        run.model_path("sft"),
        run.model_path("rm"),
        prompts,
        run.stage_dir("ppo"),
        run.show_progress,
    )


def stage_eval(run: Run) -> dict:
    from rlhfkit.eval.evaluate import evaluate_policies, label_gold_agreement, reward_model_gold_accuracy

    cfg, watch = run.config.eval, Stopwatch()
    prompts = _prompts(run.config.data.heldout_prompts, run.task.heldout_prompts)[: cfg.n_prompts]
    gold = resolve_gold(run.task) if run.task.gold else None
    policies = {"sft": run.model_path("sft")}
    if (run.stage_dir("ppo") / "model" / "config.json").is_file():
        policies["ppo"] = run.model_path("ppo")
    result = evaluate_policies(
        policies,
        "sft",
        run.model_path("rm"),
        prompts,
        gold,
        seed=run.config.seed,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        n_samples=cfg.n_samples,
    )
    rm_report: dict[str, Any] = {}
    if gold is not None and cfg.heldout_pairs:
        rm_report.update(
            reward_model_gold_accuracy(
                run.model_path("sft"),
                run.model_path("rm"),
                prompts,
                gold,
                n_pairs=cfg.heldout_pairs,
                seed=run.config.seed,
                temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens,
            )
        )
    pairs_path = _preference_path(run)
    if gold is not None and pairs_path.is_file():
        rm_report["gold_agreement"] = label_gold_agreement(_read_pairs(pairs_path), gold)
    (run.stage_dir("eval")).mkdir(parents=True, exist_ok=True)
    write_jsonl(run.stage_dir("eval") / "samples.jsonl", result["samples"])
    summary = {"wall_seconds": watch.seconds(), **result, "rm": rm_report}
    return summary


STAGE_FUNCTIONS: dict[str, Callable[[Run], dict]] = {
    "pretrain": stage_pretrain,
    "sft": stage_sft,
    "feedback": stage_feedback,
    "rm": stage_rm,
    "ppo": stage_ppo,
    "eval": stage_eval,
}


def _report_patch(run: Run, stage: str, summary: dict) -> dict:
    """What a stage's summary contributes to report.json."""
    figures = {k: v for k, v in summary.items() if k not in ("eval", "samples", "rm", "fingerprint")}
    patch: dict[str, Any] = {"stages": {stage: figures}}
    if stage == "feedback":
        patch["feedback"] = {
            k: summary[k] for k in ("n_labels", "n_annotators", "agreement_alpha", "n_items", "n_pairs")
        }
    if stage == "rm":
        patch["rm"] = {"n_train_pairs": summary["n_train_pairs"], "val_accuracy": summary["val_accuracy"]}
    if stage == "eval":
        patch["eval"] = summary["eval"]
        patch["samples"] = summary["samples"]
        patch["rm"] = summary["rm"]
    return patch


def run_stage(run: Run, stage: str, reuse: bool = False) -> dict:
    """Run one stage (or reuse its finished result), record it in report.json and report.html."""
    from rlhfkit.eval.report import write_html_report

    out = run.stage_dir(stage)
    if reuse and run.finished(stage):
        summary = json.loads((out / "summary.json").read_text())
        console.print(f"[dim]{stage}: reusing the finished stage in {out}[/dim]")
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").unlink(missing_ok=True)
        summary = STAGE_FUNCTIONS[stage](run)
        summary["fingerprint"] = run.fingerprint(stage)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        shown = {k: v for k, v in summary.items() if isinstance(v, int | float) and k != "wall_seconds"}
        console.print(
            f"[bold]{stage}[/bold] done in {summary.get('wall_seconds', 0):.0f}s: "
            + ", ".join(f"{k}={v}" for k, v in shown.items()),
            highlight=False,
        )
    report = run.update_report(_report_patch(run, stage, summary))
    if stage == "eval":
        write_html_report(run.dir, report)
    return summary


def run_demo(run: Run, stages: tuple[str, ...] = STAGES) -> dict:
    """Every stage in order, reusing finished ones; returns report.json's content."""
    for stage in stages:
        if stage == "pretrain" and run.config.model.name_or_path:
            continue
        run_stage(run, stage, reuse=True)
    return run.read_report()
