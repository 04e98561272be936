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
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console

from rlhfkit.config import FeedbackConfig, RunConfig, dump_config
from rlhfkit.data.io import read_records, source_digest, strict_json, write_jsonl
from rlhfkit.tasks import Task, load_task, resolve_gold, resolve_probes
from rlhfkit.train.loop import Stopwatch, progress_bar

if TYPE_CHECKING:
    from rlhfkit.crowd.aggregate import AggregatedPairs
    from rlhfkit.crowd.simulate import AnnotatorProfile

STAGES = ("pretrain", "sft", "feedback", "rm", "ppo", "eval")
# Config sections each stage reads; a stage also depends on everything before it.
_SECTIONS = {
    "pretrain": ("seed", "model", "data", "pretrain"),
    # LoRA changes what SFT (and every later training stage) trains, so it sits this far up.
    "sft": ("sft", "lora"),
    "feedback": ("feedback",),
    "rm": ("rm",),
    "ppo": ("ppo", "rollout"),
    "eval": ("eval",),
}
# Keys of a section that only the eval stage reads: changing one re-runs eval alone.
_EVAL_ONLY = {"rm": ("label_curve",)}
# Data files each stage reads (config keys): their content is part of the stage's fingerprint, so a
# file edited in place makes the stage that reads it, and everything downstream, run again.
_INPUTS = {
    "sft": ("data.demonstrations",),
    "feedback": ("data.prompts", "feedback.pool"),
    "rm": ("data.preferences",),
    "ppo": ("data.prompts",),
    "eval": ("data.heldout_prompts", "eval.references"),
}
# How often a stage saves checkpoints does not change what it computes (eval sweeps PPO's).
_CHECKPOINT_KEYS = ("save_every", "keep_states")
# Method stages outside the demo (issue 4), each with the last demo stage it builds on:
# dpo/kto need the SFT model and the feedback pairs, the online methods the reward model.
METHOD_STAGES = {
    "dpo": "feedback",
    "kto": "feedback",
    "grpo": "rm",
    "rloo": "rm",
    "bon": "rm",
    "expert_iter": "rm",
}
_INPUTS.update(
    {
        "dpo": ("data.preferences",),
        "kto": ("data.unpaired", "data.preferences"),  # kto derives thumbs from the pairs without unpaired
        "grpo": ("data.prompts",),
        "rloo": ("data.prompts",),
        "bon": ("data.heldout_prompts",),
        "expert_iter": ("data.prompts",),
    }
)
_SECTIONS.update(
    {
        "dpo": ("dpo",),
        "kto": ("kto",),
        "grpo": ("grpo", "rollout"),
        "rloo": ("rloo", "rollout"),
        "bon": ("bon", "eval", "rollout"),  # best-of-n is judged on the eval prompts with the eval settings
        "expert_iter": ("expert_iter", "rollout"),
    }
)

console = Console()


def _config_value(cfg: dict[str, Any], key: str) -> Any:
    """The value of a dotted key ("data.prompts") in a dumped config."""
    section, _, name = key.partition(".")
    return cfg[section][name]


class StageError(RuntimeError):
    """A stage cannot run: a missing upstream artifact or unusable input."""


class Run:
    """A run directory and the config it runs with."""

    def __init__(
        self,
        out: Path,
        config: RunConfig,
        show_progress: bool = True,
        resume: bool = False,
        restart_changed: bool = False,
    ):
        self.dir = Path(out)
        self.config = config
        self.show_progress = show_progress
        # Continue an interrupted training stage from its newest checkpoint. One made with another
        # config is refused (an explicit --resume), or with `restart_changed` (the demo and the loop,
        # which resume by themselves) the stage starts over.
        self.resume = resume
        self.restart_changed = restart_changed
        self._task: Task | None = None
        self._digests: dict[str, str] = {}
        if self.dir.exists() and not self.dir.is_dir():
            raise StageError(f"--out {self.dir}: that is a file, not a run directory")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StageError(f"--out {self.dir}: cannot create the run directory ({exc.strerror})") from None

    def record_config(self) -> None:
        """Write config.yaml: the config of the last command whose stage ran (or was reused). Not
        before: a command refused for bad input leaves the run's config.yaml as it was."""
        (self.dir / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")

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
        """What a stage's result depends on, hashed: its own and every upstream stage's config
        sections, and the content of the data files those stages read."""
        cfg = self.config.model_dump(mode="json")
        upstream = METHOD_STAGES.get(stage, stage)
        stages = STAGES[: STAGES.index(upstream) + 1] + ((stage,) if stage in METHOD_STAGES else ())
        picked = {k: cfg[k] for s in stages for k in _SECTIONS[s]}
        if stage != "eval":
            for section in picked:
                dropped = _EVAL_ONLY.get(section, ()) + _CHECKPOINT_KEYS
                if isinstance(picked[section], dict):
                    picked[section] = {k: v for k, v in picked[section].items() if k not in dropped}
        if "data" in picked:
            # A data file counts where a stage reads it, by its content (`inputs`), not by its path
            # in every stage: another preference file re-runs rm onwards, not pretraining.
            picked["data"] = {k: v if k == "task" else None for k, v in picked["data"].items()}
        sources = {key: _config_value(cfg, key) for s in stages for key in _INPUTS.get(s, ())}
        # Absent when no stage reads a data file, so such runs keep the fingerprints they had.
        if inputs := {key: self._digest(source) for key, source in sources.items() if source is not None}:
            picked["inputs"] = inputs
        blob = json.dumps(picked, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _digest(self, source: str) -> str:
        """`source_digest`, once per source in this command (a stage asks for several fingerprints)."""
        if source not in self._digests:
            self._digests[source] = source_digest(source)
        return self._digests[source]

    def checkpointing(
        self, stage: str, out_dir: Path | None = None, fingerprint: str | None = None
    ) -> dict[str, Any]:
        """A training stage's `resume` and `fingerprint` arguments (its folder: `out_dir`, by default
        the stage's own). A checkpoint made with another config (or data) is never continued: the stage
        refuses it, or, with `restart_changed`, is told to start over."""
        from rlhfkit.train.checkpoint import latest_resumable, made_with

        fingerprint = fingerprint or self.fingerprint(stage)
        folder = out_dir or self.stage_dir(stage)
        resume = self.resume
        if resume and self.restart_changed:
            # Resuming by itself: quietly start a stage that has nothing to continue.
            if latest_resumable(folder / "checkpoints") is None:
                resume = False
            elif not made_with(folder, fingerprint):
                console.print(f"[dim]{stage}: checkpoints of another config or data; starting over[/dim]")
                resume = False
        return {"resume": resume, "fingerprint": fingerprint}

    def finished(self, stage: str) -> bool:
        summary = self.stage_dir(stage) / "summary.json"
        if not summary.is_file():
            return False
        return json.loads(summary.read_text()).get("fingerprint") == self.fingerprint(stage)

    def read_report(self) -> dict[str, Any]:
        path = self.dir / "report.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_report(self, patch: dict[str, Any], replace: tuple[str, ...] = ()) -> dict[str, Any]:
        """Merge `patch` into report.json (written atomically, so a crash never leaves half a file).
        A section named in `replace` is replaced whole, so none of its old keys outlive the run
        that wrote it. NaN and infinity are written as null (strict JSON has neither)."""
        report = self.read_report()
        report.setdefault("task", self.task.name)
        report["seed"] = self.config.seed
        for key, value in patch.items():
            if key not in replace and isinstance(value, dict) and isinstance(report.get(key), dict):
                report[key].update(value)
            else:
                report[key] = value
        report["wall_seconds"] = round(
            sum(s.get("wall_seconds", 0.0) for s in report.get("stages", {}).values()), 2
        )
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(strict_json(report), f, indent=2, allow_nan=False)
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
    """Validated preference pairs as {prompt, chosen, rejected, margin} with plain-text completions."""
    return [
        {
            "prompt": _as_text(r.prompt),
            "chosen": _completion_text(r.chosen),
            "rejected": _completion_text(r.rejected),
            "margin": r.margin,
        }
        for r in read_records(path, "preference")
    ]


def stage_pretrain(run: Run) -> dict:
    from rlhfkit.train.pretrain import run_pretrain

    if run.config.model.name_or_path:
        raise StageError("model.name_or_path is set: there is nothing to pretrain, start at `sft`")
    if not run.task.corpus:
        raise StageError(f"task {run.task.name!r} has no pretraining corpus; set model.name_or_path")
    return run_pretrain(
        run.config,
        run.task.corpus,
        run.stage_dir("pretrain"),
        run.show_progress,
        **run.checkpointing("pretrain"),
    )


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
    return run_sft(
        run.config, init, demos, run.stage_dir("sft"), run.show_progress, **run.checkpointing("sft")
    )


def comparison_items(
    policy_path: Path,
    prompts: list,
    cfg: FeedbackConfig,
    seed: int,
    rng: random.Random,
    policy: str,
    partner: tuple[Path, str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """Items for the store: `cfg.completions_per_prompt` (K) samples of the policy per prompt.

    K = 2 gives A/B comparisons; K > 2 gives rankings of the distinct non-empty samples
    (an item keeps at least two; a prompt whose samples leave fewer is left out, as is a
    comparison of two identical samples). `rng` draws which items get `cfg.overlap`
    annotators. `policy` names the sampler in the meta. With `partner` (a model path and its
    name), one of the K samples comes from the partner instead, at a position `rng` draws per
    item (annotators have position biases), and `meta.sampled_from` names each response's model.
    `on_batch(n)` is told of every n samples drawn.
    """
    from rlhfkit.models.loading import check_prompt_room, load_causal_lm, load_tokenizer, position_table
    from rlhfkit.models.tokenizer import prompt_token_ids
    from rlhfkit.rollout.generate import sample_texts

    tokenizer = load_tokenizer(policy_path)
    for path in (policy_path,) if partner is None else (policy_path, partner[0]):
        check_prompt_room(
            position_table(path), tokenizer, prompts, "feedback.max_new_tokens", cfg.max_new_tokens
        )
    model = load_causal_lm(policy_path)
    models = [model] * cfg.completions_per_prompt
    names = [policy] * cfg.completions_per_prompt
    if partner is not None:
        models[0], names[0] = load_causal_lm(partner[0]), partner[1]
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]

    torch.manual_seed(seed)
    samples = [
        sample_texts(
            sampler,
            tokenizer,
            ids,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            on_batch=on_batch,
        )
        for sampler in models
    ]
    items = []
    for i, prompt in enumerate(prompts):
        drawn = [(s[i], name) for s, name in zip(samples, names, strict=True)]
        if partner is not None:
            rng.shuffle(drawn)
        if cfg.completions_per_prompt > 2:
            # A ranking orders distinct, non-empty texts (the store refuses an empty one).
            first: dict[str, str] = {}
            for response, name in drawn:
                if response.strip() and response not in first:
                    first[response] = name
            drawn = list(first.items())
        if len({r for r, _ in drawn}) < 2:
            continue  # identical samples: nothing to compare
        meta: dict[str, Any] = {"policy": policy}
        if partner is not None:
            meta["sampled_from"] = [n for _, n in drawn]
        items.append(
            {
                "prompt": prompt,
                "responses": [r for r, _ in drawn],
                "overlap": cfg.overlap if rng.random() < cfg.overlap_share else 1,
                "meta": meta,
            }
        )
    return items


def feedback_store_url(run: Run) -> str:
    """The feedback store's database: feedback.db if set, else RUN/feedback.db (SQLite)."""
    return run.config.feedback.db or f"sqlite:///{(run.dir / 'feedback.db').resolve()}"


def feedback_project_name(run: Run) -> str:
    """The feedback stage's project in the store: one per feedback config."""
    return f"{run.config.feedback.project}-{run.fingerprint('feedback')[:8]}"


def training_labels(store: Any, project: int) -> tuple[dict[int, Any], list]:
    """A project's items by id, and the labels that become training data.

    Golden items and excluded annotators stay out of training data, as in every export.
    """
    items = {item.item_id: item for item in store.items(project)}
    return items, store.labels(project, include_golden=False, include_excluded=False)


def feedback_pairs(config: RunConfig, items: dict[int, Any], labels: list) -> AggregatedPairs:
    """Preference rows from `labels`, aggregated by feedback.aggregate with margins from
    feedback.margin as the feedback stage does, with the counts of the items that gave none."""
    from rlhfkit.crowd.aggregate import aggregate_pairs

    cfg = config.feedback
    return aggregate_pairs(items, labels, cfg.aggregate, f"feedback:{cfg.project}", config.seed, cfg.margin)


def simulated_pool(run: Run) -> list[AnnotatorProfile]:
    """The simulated annotators of feedback.pool (the default pool if unset); a StageError if there
    are fewer of them than feedback.overlap.

    No simulated annotator labels an item twice: items that need more annotators than the pool has
    are never complete. A loop round would wait loop.label_timeout for nothing, the feedback stage
    would train on half-labelled items.
    """
    from rlhfkit.crowd.simulate import default_pool, load_pool

    fb = run.config.feedback
    pool = load_pool(fb.pool) if fb.pool is not None else default_pool()
    if fb.overlap_share > 0 and fb.overlap > len(pool):
        raise StageError(
            f"feedback.overlap={fb.overlap} asks for {fb.overlap} annotators per item, but the simulated "
            f"pool has {len(pool)} annotators: lower feedback.overlap or add annotators to feedback.pool"
        )
    return pool


def stage_feedback(run: Run) -> dict:
    """Sample from the SFT policy, collect simulated comparisons in the store, export pairs."""
    from rlhfkit.crowd.agreement import krippendorff_alpha_nominal
    from rlhfkit.crowd.simulate import simulate_annotation
    from rlhfkit.feedback.store import FeedbackStore

    cfg, watch = run.config.feedback, Stopwatch()
    out = run.stage_dir("feedback")
    out.mkdir(parents=True, exist_ok=True)
    # Seeded: the left/right order shown to annotators is part of what makes a run reproducible.
    # Not fsynced per label: simulated labels survive a crash of the process, which is enough for
    # labels that can be simulated again; a human-facing server keeps the durable default.
    # The pool is read first: a bad pool file is refused before minutes of sampling.
    annotators = simulated_pool(run)
    store = FeedbackStore(feedback_store_url(run), seed=run.config.seed, durable=False)
    try:
        project = store.create_project(feedback_project_name(run), task_type=cfg.task_type, overlap=1)
        # A project that already has items was interrupted: keep its labels, label the rest.
        if not store.items(project):
            rng = random.Random(f"feedback-{run.config.seed}")
            pool = _prompts(run.config.data.prompts, run.task.train_prompts)
            prompts = [
                pool[i % len(pool)] for i in rng.sample(range(max(cfg.n_prompts, len(pool))), cfg.n_prompts)
            ]
            total = len(prompts) * cfg.completions_per_prompt
            with progress_bar("feedback samples", total, enabled=run.show_progress) as bar:
                items = comparison_items(
                    run.model_path("sft"),
                    prompts,
                    cfg,
                    run.config.seed,
                    rng,
                    "sft",
                    on_batch=lambda n: bar.advance(bar.task_ids[0], n),
                )
            store.add_items(project, items)
        gold = resolve_gold(run.task)
        left = sum(item.overlap for item in store.items(project)) - len(store.labels(project))
        with progress_bar("feedback labels", left, enabled=run.show_progress) as bar:
            stats = simulate_annotation(
                store,
                project,
                annotators,
                gold,
                seed=run.config.seed,
                progress=lambda n: bar.update(bar.task_ids[0], completed=n),
            )
        labels = store.labels(project)
        by_item: dict[int, list] = {}
        for label in labels:
            by_item.setdefault(label.item_id, []).append("tie" if label.chosen is None else label.chosen)
        alpha = krippendorff_alpha_nominal(by_item)
        aggregated = feedback_pairs(run.config, *training_labels(store, project))
        n_pairs = write_jsonl(out / "pairs.jsonl", aggregated.rows)
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
        # Items that made no pair: no winner, or a winner between two identical responses.
        "n_undecided": aggregated.n_undecided,
        "n_identical_skipped": aggregated.n_identical,
        "agreement_alpha": None if alpha is None else round(alpha, 4),
        "per_annotator": stats.get("per_annotator", {}),
    }


def stage_rm(run: Run) -> dict:
    from rlhfkit.train.rm import run_rm

    pairs = _training_pairs(run)
    return run_rm(
        run.config,
        run.model_path("sft"),
        pairs,
        run.stage_dir("rm"),
        run.show_progress,
        **run.checkpointing("rm"),
    )


def stage_ppo(run: Run) -> dict:
    from rlhfkit.train.ppo import run_ppo

    prompts = _prompts(run.config.data.prompts, run.task.train_prompts)
    if run.config.ppo.ptx_coef > 0 and not run.task.corpus:
        raise StageError(f"ppo.ptx_coef > 0 needs a pretraining corpus; task {run.task.name!r} has none")
    return run_ppo(
        run.config,
        run.model_path("sft"),
        run.model_path("rm"),
        prompts,
        run.stage_dir("ppo"),
        run.show_progress,
        ptx_corpus=run.task.corpus if run.config.ppo.ptx_coef > 0 else None,
        **run.checkpointing("ppo"),
    )


def stage_eval(run: Run) -> dict:
    from rlhfkit.eval import evaluate
    from rlhfkit.eval.rm_bench import (
        benchmark_on_pairs,
        gold_pairs,
        heldout_report,
        heldout_skip_reason,
        probe_accuracies,
        seen_topic_subset,
    )
    from rlhfkit.models.loading import load_causal_lm, load_reward_model, load_tokenizer

    cfg, watch = run.config.eval, Stopwatch()
    prompts = _prompts(run.config.data.heldout_prompts, run.task.heldout_prompts)[: cfg.n_prompts]
    gold = resolve_gold(run.task) if run.task.gold else None
    policies = evaluate.resolve_policies(run.dir, cfg.policies)
    topic_of = evaluate.task_topic_of(run.task.gold)
    if cfg.references is not None:
        references = evaluate.file_references(cfg.references, prompts)
    elif topic_of is not None:
        references = evaluate.topic_references(prompts, run.task.demonstrations, topic_of)
    else:
        references = None
    rm_path = run.model_path("rm") if (run.stage_dir("rm") / "model" / "config.json").is_file() else None
    # A reference given as a folder (as in eval.policies) is the policy named after it.
    reference = evaluate.reference_policy(run.dir, policies, cfg.reference) if cfg.reference else None
    result = evaluate.evaluate_policies(
        policies,
        reference or next(iter(policies)),
        rm_path,
        prompts,
        gold,
        seed=run.config.seed,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        n_samples=cfg.n_samples,
        judge=cfg.judge,
        references=references,
        ci_method=cfg.ci_method,
        llm_judge=evaluate.load_llm_judge(cfg.judge_model) if cfg.judge == "llm" else None,
    )
    # Only now: a refused eval (a policy, judge or length that cannot be used) leaves no folder.
    run.stage_dir("eval").mkdir(parents=True, exist_ok=True)
    rm_report: dict[str, Any] = {}
    heldout = None
    skipped = heldout_skip_reason(gold is not None, cfg.heldout_pairs, rm_path is not None)
    if skipped is not None:
        rm_report.update(heldout_report(None, skipped))
    else:
        heldout = gold_pairs(
            run.model_path("sft"),
            prompts,
            gold,
            n_pairs=cfg.heldout_pairs,
            seed=run.config.seed,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            topic_subset=seen_topic_subset(topic_of, run.task.demonstrations) if topic_of else None,
        )
        reward_model = load_reward_model(rm_path, heldout.pad_id)
        bench = benchmark_on_pairs(reward_model, heldout)
        rm_report.update(heldout_report(bench))
        if run.task.probes:
            # One known defect per pair: which of the things the judge rewards the RM learned.
            sft_path = run.model_path("sft")
            probes = resolve_probes(run.task)(prompts, run.config.seed)
            rm_report["probes"] = probe_accuracies(
                reward_model, load_causal_lm(sft_path), load_tokenizer(sft_path), probes
            )
    pairs_path = _preference_path(run)
    # data.preferences may name a dataset folder or hf: id rather than a file: it is read as given.
    if gold is not None and (run.config.data.preferences is not None or pairs_path.is_file()):
        rm_report["gold_agreement"] = evaluate.label_gold_agreement(_read_pairs(pairs_path), gold)
    if run.config.rm.label_curve:
        from rlhfkit.label_curve import measure_label_curve

        # Last: its reward models reseed the global RNGs, which nothing after this draws from.
        curve_watch = Stopwatch()
        curve = measure_label_curve(run, heldout, rm_report.get("heldout_accuracy"))
        if curve is not None:
            rm_report.update(label_curve=curve, label_curve_seconds=curve_watch.seconds())
    write_jsonl(run.stage_dir("eval") / "samples.jsonl", result["samples"])
    summary = {"wall_seconds": watch.seconds(), **result, "rm": rm_report}
    return summary


def _training_pairs(run: Run) -> list[dict]:
    """The preference pairs the RM and the direct methods learn from; an error if there are none."""
    path = _preference_path(run)
    if not path.is_file() and run.config.data.preferences is None:
        raise StageError(
            f"{path} not found: run `rlhfkit feedback simulate --out {run.dir}` first or set data.preferences"
        )
    return _read_pairs(path)


def _reward_terms(run: Run, specs: list, prompts: list, key: str, new_tokens: int) -> list:
    """The reward terms of a critic-free stage that samples `new_tokens` (config `key`) from the SFT
    policy on `prompts`. The lengths are checked first: a bad one is refused before the reward model
    loads (the stage checks them again at its start, for callers of its train function)."""
    from rlhfkit.models.loading import check_prompt_room, load_tokenizer, position_table
    from rlhfkit.train.rewards import build_reward_functions, needs_reward_model

    sft = run.model_path("sft")
    check_prompt_room(position_table(sft), load_tokenizer(sft), prompts, key, new_tokens)
    return build_reward_functions(specs, run.model_path("rm") if needs_reward_model(specs) else None)


def stage_dpo(run: Run) -> dict:
    from rlhfkit.train.dpo import run_dpo

    pairs = _training_pairs(run)
    return run_dpo(
        run.config,
        run.model_path("sft"),
        pairs,
        run.stage_dir("dpo"),
        run.show_progress,
        **run.checkpointing("dpo"),
    )


def stage_kto(run: Run) -> dict:
    """KTO on data.unpaired, or on thumbs derived from the preference pairs when there is none."""
    from rlhfkit.train.kto import run_kto, unpaired_from_pairs

    if run.config.data.unpaired:
        examples = [
            {"prompt": _as_text(r.prompt), "completion": _completion_text(r.completion), "label": r.label}
            for r in read_records(run.config.data.unpaired, "unpaired")
        ]
    else:
        examples = unpaired_from_pairs(_training_pairs(run))
        console.print(
            f"kto: data.unpaired is not set; using {len(examples)} examples derived from the preference "
            "pairs (chosen = thumbs up, rejected = thumbs down)",
            highlight=False,
        )
    summary = run_kto(
        run.config,
        run.model_path("sft"),
        examples,
        run.stage_dir("kto"),
        run.show_progress,
        **run.checkpointing("kto"),
    )
    return {**summary, "derived_from_pairs": not run.config.data.unpaired}


def _critic_free_stage(run: Run, section: str) -> dict:
    from rlhfkit.train.grpo import run_critic_free

    prompts = _prompts(run.config.data.prompts, run.task.train_prompts)
    cfg = getattr(run.config, section)
    terms = _reward_terms(run, cfg.rewards, prompts, f"{section}.max_new_tokens", cfg.max_new_tokens)
    return run_critic_free(
        run.config,
        section,
        run.model_path("sft"),
        terms,
        prompts,
        run.stage_dir(section),
        run.show_progress,
        **run.checkpointing(section),
    )


def stage_grpo(run: Run) -> dict:
    return _critic_free_stage(run, "grpo")


def stage_rloo(run: Run) -> dict:
    return _critic_free_stage(run, "rloo")


def stage_bon(run: Run) -> dict:
    """Best-of-n from the SFT policy on the held-out prompts, judged like `eval` judges policies."""
    from rlhfkit.eval.winrate import win_rate
    from rlhfkit.train.bon import best_of_n_summary, sample_best_of_n, write_best_of_n_samples

    cfg, ev, watch = run.config.bon, run.config.eval, Stopwatch()
    prompts = _prompts(run.config.data.heldout_prompts, run.task.heldout_prompts)[: ev.n_prompts]
    result = sample_best_of_n(
        run.model_path("sft"),
        prompts,
        _reward_terms(run, cfg.rewards, prompts, "eval.max_new_tokens", ev.max_new_tokens),
        cfg.n,
        seed=run.config.seed,
        temperature=ev.temperature,
        max_new_tokens=ev.max_new_tokens,
        rollout=run.config.rollout,
    )
    write_best_of_n_samples(run.stage_dir("bon") / "samples.jsonl", prompts, result)
    # No weights: the best-of-n policy is the SFT model plus the reward and n, written down here.
    policy = {
        "policy": str(run.model_path("sft")),
        "n": cfg.n,
        "rewards": [r.model_dump() for r in cfg.rewards],
    }
    (run.stage_dir("bon") / "policy.json").write_text(json.dumps(policy, indent=2))
    summary = {"wall_seconds": watch.seconds(), "n_prompts": len(prompts)}
    summary.update(best_of_n_summary(result, cfg.n))
    if (run.stage_dir("rm") / "model" / "config.json").is_file():
        # The proxy reward exactly as `eval` measures it: the RM on the sampled token ids.
        from rlhfkit.eval.evaluate import score_with_reward_model
        from rlhfkit.models.loading import load_reward_model, load_tokenizer
        from rlhfkit.models.tokenizer import prompt_token_ids

        tokenizer = load_tokenizer(run.model_path("sft"))
        reward_model = load_reward_model(run.model_path("rm"), tokenizer.pad_token_id).eval()
        prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
        proxy = score_with_reward_model(reward_model, prompt_ids, result["best_ids"], tokenizer.pad_token_id)
        summary["proxy_reward"] = round(sum(proxy) / len(proxy), 4)
    if run.task.gold:
        gold = resolve_gold(run.task)
        best = [gold(p, t) for p, t in zip(prompts, result["best"], strict=True)]
        # Draw 0 is the SFT policy's own sample on the same prompt: the paired baseline.
        single = [gold(p, t) for p, t in zip(prompts, result["candidates"][0], strict=True)]
        summary["gold_reward"] = round(sum(best) / len(best), 4)
        summary["gold_reward_single"] = round(sum(single) / len(single), 4)
        summary["win_rate_vs_sft"] = win_rate(best, single, method=ev.ci_method, seed=run.config.seed)
    return summary


def stage_expert_iter(run: Run) -> dict:
    from rlhfkit.train.bon import run_expert_iteration

    prompts = _prompts(run.config.data.prompts, run.task.train_prompts)
    cfg = run.config.expert_iter
    terms = _reward_terms(run, cfg.rewards, prompts, "expert_iter.max_new_tokens", cfg.max_new_tokens)
    return run_expert_iteration(
        run.config, run.model_path("sft"), terms, prompts, run.stage_dir("expert_iter"), run.show_progress
    )


STAGE_FUNCTIONS: dict[str, Callable[[Run], dict]] = {
    "pretrain": stage_pretrain,
    "sft": stage_sft,
    "feedback": stage_feedback,
    "rm": stage_rm,
    "ppo": stage_ppo,
    "eval": stage_eval,
    "dpo": stage_dpo,
    "kto": stage_kto,
    "grpo": stage_grpo,
    "rloo": stage_rloo,
    "bon": stage_bon,
    "expert_iter": stage_expert_iter,
}


# What the eval stage adds to report.json's rm section: figures of the reward model it judged.
RM_EVAL_KEYS = (
    "heldout_accuracy",
    "heldout_accuracy_reason",
    "n_heldout_pairs",
    "gold_agreement",
    "bench",
    "probes",
    "label_curve",
)


def _report_patch(run: Run, stage: str, summary: dict) -> tuple[dict, tuple[str, ...]]:
    """What a stage's summary contributes to report.json, and the sections it replaces whole.

    The eval stage owns `eval` and `samples` (a run with another reference or other policies
    leaves none of the last run's keys) and its keys of `rm`; training a reward model again
    drops those too, since they judged the reward model it replaces."""
    figures = {k: v for k, v in summary.items() if k not in ("eval", "samples", "rm", "fingerprint")}
    patch: dict[str, Any] = {"stages": {stage: figures}}
    replace: tuple[str, ...] = ()
    if stage == "feedback":
        patch["feedback"] = {
            k: summary[k] for k in ("n_labels", "n_annotators", "agreement_alpha", "n_items", "n_pairs")
        }
    if stage in ("rm", "eval"):
        kept = {k: v for k, v in run.read_report().get("rm", {}).items() if k not in RM_EVAL_KEYS}
        if stage == "rm":
            kept.update(n_train_pairs=summary["n_train_pairs"], val_accuracy=summary["val_accuracy"])
        else:
            kept.update(summary["rm"])
            patch["eval"] = summary["eval"]
            patch["samples"] = summary["samples"]
        patch["rm"] = kept
        replace = ("rm", "eval", "samples")
    return patch, replace


def run_stage(run: Run, stage: str, reuse: bool = False) -> dict:
    """Run one stage (or reuse its finished result), record it in report.json and report.html."""
    from rlhfkit.eval.report import write_html_report
    from rlhfkit.train.checkpoint import TrainingInterrupted

    out = run.stage_dir(stage)
    if reuse and run.finished(stage):
        summary = json.loads((out / "summary.json").read_text())
        console.print(f"[dim]{stage}: reusing the finished stage in {out}[/dim]")
    else:
        # The stage creates its folder once its checks pass: a refused stage leaves no empty
        # folder behind. The stage is not finished while it runs again. Input errors (a bad data
        # file, a missing upstream model, a bad pool) come before a stage replaces its outputs
        # (models and data files are written at its end), so then the previous result is whole
        # and stays finished.
        marker = out / "summary.json"
        previous = marker.read_bytes() if marker.is_file() else None
        marker.unlink(missing_ok=True)
        try:
            summary = STAGE_FUNCTIONS[stage](run)
        except (StageError, ValueError):  # DataError is a ValueError
            if previous is not None:
                marker.write_bytes(previous)
            raise
        except TrainingInterrupted:
            run.record_config()  # its checkpoint was made with this config
            raise
        summary["fingerprint"] = run.fingerprint(stage)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
        shown = {k: v for k, v in summary.items() if isinstance(v, int | float) and k != "wall_seconds"}
        console.print(
            f"[bold]{stage}[/bold] done in {summary.get('wall_seconds', 0):.0f}s: "
            + ", ".join(f"{k}={v}" for k, v in shown.items()),
            highlight=False,
        )
    report = run.update_report(*_report_patch(run, stage, summary))
    run.record_config()
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
