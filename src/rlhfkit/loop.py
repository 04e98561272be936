"""Online iterated RLHF (`rlhfkit loop`): collect feedback on the current policy, retrain, repeat.

Round 1 is the demo up to the first PPO (pretrain, sft, feedback, rm, ppo). Each later round K:

1. samples comparisons from the current policy (round K-1's PPO model) on prompts the earlier
   rounds compared least, into a project of its own in the feedback store, or on the service at
   `loop.feedback_url` through its HTTP API;
2. lets the simulated pool label them (through the store, or over HTTP with one login per
   annotator), or waits for people to label them, until `loop.min_complete` of the items have
   all their labels or `loop.label_timeout` runs out;
3. aggregates the round's labels (`loop.aggregate`, unset = `feedback.aggregate`) into pairs;
4. trains a reward model from the SFT model on ALL pairs so far: a fresh fit weighs every
   round's pairs alike and does not depend on the order the data came in, which continuing to
   train the previous reward model would (its early pairs would be seen once per round);
5. runs PPO against that reward model, from the SFT model (`loop.ppo_from: sft`, the default) or
   from the current policy (`previous`); the KL reference stays the SFT model either way, so the
   KL penalty keeps bounding the total drift, not only this round's step;
6. evaluates the new policy against SFT on the held-out prompts (gold and proxy reward, KL,
   win rate) and the reward model on gold-labelled pairs of SFT samples.

Everything of round K lives in RUN/loop/round-K/ (round 1's models are the demo's RUN/rm and
RUN/ppo). A round is reused when its summary.json carries the fingerprint of the same config;
one that runs again makes the rounds after it run again too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from rlhfkit.config import RunConfig
from rlhfkit.data.io import read_jsonl, write_jsonl
from rlhfkit.pipeline import (
    Run,
    StageError,
    _preference_path,
    _prompts,
    _read_pairs,
    _training_pairs,
    comparison_items,
    feedback_store_url,
    run_stage,
    simulated_pool,
)
from rlhfkit.tasks import resolve_gold
from rlhfkit.train.loop import Stopwatch

console = Console()

LOOP_DIR = "loop"
# Items per request when a round's comparisons go to a feedback service over HTTP.
ITEMS_PER_REQUEST = 1000
PASSWORD_ENV = "RLHFKIT_FEEDBACK_PASSWORD"
# Settings that say where and how patiently labels are collected, not what a round computes:
# changing them keeps finished rounds (so `--rounds 5` after 3 rounds runs only rounds 4 and 5).
_OPERATIONAL = (
    "rounds",
    "annotators",
    "feedback_url",
    "feedback_user",
    "label_timeout",
    "poll_seconds",
    "min_complete",
)
# The per-round figures report.json's loop.rounds lists.
ROUND_KEYS = (
    "round",
    "n_labels_total",
    "n_pairs_total",
    "rm_heldout_accuracy",
    "gold_reward",
    "proxy_reward",
    "kl_from_sft",
    "win_rate_vs_sft",
    "judge",
    "judge_model",
)


class LabelTimeout(StageError):
    """A round's labels did not arrive in time (people have not finished labelling)."""


def round_dir(run: Run, k: int) -> Path:
    """RUN/loop/round-K."""
    return run.dir / LOOP_DIR / f"round-{k}"


def round_fingerprint(run: Run, k: int) -> str:
    """Round K's identity: every stage config up to ppo, the eval and loop settings, and K."""
    loop = {key: v for key, v in run.config.loop.model_dump(mode="json").items() if key not in _OPERATIONAL}
    blob = json.dumps(
        {
            "upstream": run.fingerprint("ppo"),
            "eval": run.config.eval.model_dump(mode="json"),
            "loop": loop,
            "round": k,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pick_prompts(pool: Sequence[Any], used: Sequence[Any], n: int, rng: random.Random) -> list[Any]:
    """`n` prompts from `pool`, those compared least often in earlier rounds first (shuffled within).

    When the pool has fewer than `n` prompts, each is taken again as evenly as the count allows.
    """
    if not pool:
        raise StageError("no training prompts to sample comparisons on")
    counts: dict[str, int] = {}
    for prompt in used:
        key = json.dumps(prompt, sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    order = list(range(len(pool)))
    rng.shuffle(order)
    order.sort(key=lambda i: counts.get(json.dumps(pool[i], sort_keys=True), 0))
    return [pool[order[i % len(order)]] for i in range(n)]


def wait_for_labels(
    progress: Callable[[], Mapping[str, int]],
    min_complete: float,
    timeout: float,
    poll: float,
    where: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, int]:
    """Poll `progress()` until `min_complete` of the items have all their labels; its last answer.

    Raises LabelTimeout, saying how far labelling got and what to do, after `timeout` seconds.
    """
    deadline = clock() + timeout
    last_shown = None
    while True:
        now = dict(progress())
        needed = math.ceil(min_complete * now["n_items"])
        if now["n_items_complete"] >= needed:
            return now
        if clock() >= deadline:
            raise LabelTimeout(
                f"{where}: only {now['n_items_complete']} of {now['n_items']} items have all their "
                f"labels after waiting {timeout:g}s (this round needs {needed}); the annotators have not "
                "finished. Labels already given are kept: run `rlhfkit loop` again with the same "
                "--out/--config to go on waiting (finished rounds are reused), or raise "
                "loop.label_timeout, or lower loop.min_complete"
            )
        if now["n_items_complete"] != last_shown:
            console.print(
                f"[dim]{where}: {now['n_items_complete']}/{now['n_items']} items labelled, "
                f"waiting for {needed}[/dim]",
                highlight=False,
            )
            last_shown = now["n_items_complete"]
        sleep(max(0.0, min(poll, deadline - clock())))


@dataclass(frozen=True)
class _Item:
    """What aggregation reads from an item: its prompt (as exports write it) and responses."""

    prompt: Any
    responses: list[str]


def votes_from_raw(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Any], dict[int, _Item]]:
    """PairVotes and items from raw export rows: comparisons, and rankings as their C(K, 2) pairs.

    Golden items and labels of other kinds are left out.
    """
    from rlhfkit.crowd.aggregate import PairVote, ranking_votes

    votes, items = [], {}
    for row in rows:
        kind = row.get("kind", "comparison")
        if row.get("golden") or kind not in ("comparison", "ranking"):
            continue
        item = _Item(row["prompt"], list(row["responses"]))
        if kind == "ranking":
            ranking = (row.get("value") or {})["ranking"]
            votes += ranking_votes(row["item_id"], row["annotator"], item.prompt, item.responses, ranking)
        else:
            left, right = row["order"]
            # The strength travels with the vote for feedback.margin=strength (absent in an import).
            votes.append(
                PairVote(row["item_id"], row["annotator"], left, right, row["chosen"], row.get("strength"))
            )
        items[row["item_id"]] = item
    return votes, items


class StoreFeedback:
    """A round's comparisons in the run's feedback store (SQLite file or DB URL)."""

    def __init__(self, run: Run, seed: int):
        from rlhfkit.feedback.store import FeedbackStore

        url = feedback_store_url(run)
        # Durable: with people labelling through `rlhfkit feedback serve` on the same database,
        # an acknowledged label must survive; simulated labels pay a little speed for it.
        self.store = FeedbackStore(url, seed=seed, durable=run.config.loop.annotators == "human")
        self.where = self.store.url

    def project(self, name: str, task_type: str) -> int:
        """The id of the project `name` of `task_type` (comparison or ranking; created if new)."""
        return self.store.create_project(name, task_type=task_type, overlap=1)

    def n_items(self, project_id: int) -> int:
        """Items already in the project."""
        return self.store.progress(project_id)["n_items"]

    def add_items(self, project_id: int, items: list[dict]) -> None:
        """Add comparison items."""
        self.store.add_items(project_id, items)

    def progress(self, project_id: int) -> dict[str, int]:
        """n_items, n_items_complete, n_labels."""
        return self.store.progress(project_id)

    def raw_rows(self, project_id: int) -> list[dict[str, Any]]:
        """Every label as a raw export row (excluded annotators left out, as in every export)."""
        from rlhfkit.feedback.exports import raw_rows

        items = {item.item_id: item for item in self.store.items(project_id)}
        labels = self.store.labels(project_id, include_excluded=False)
        return list(raw_rows(items, labels))

    def annotation_target(self, names: Sequence[str], run: Run) -> Any:
        """What simulated annotators label through: the store itself."""
        return self.store

    def close(self) -> None:
        """Close the store."""
        self.store.close()


class ServiceFeedback:
    """A round's comparisons on the feedback service at `url`, through its HTTP API as an admin."""

    def __init__(self, url: str, user: str, password: str):
        from rlhfkit.feedback.client import FeedbackClient, FeedbackClientError

        self.url, self.where = url, url
        self.client = FeedbackClient(url)
        try:
            self.client.login(user, password)
        except FeedbackClientError as exc:
            raise StageError(f"feedback service {url}: cannot log in as {user!r}: {exc.detail}") from None
        except OSError as exc:
            raise StageError(f"feedback service {url} cannot be reached: {exc}") from None

    def project(self, name: str, task_type: str) -> int:
        """The id of the project `name` of `task_type` (comparison or ranking; created if new)."""
        for project in self.client.projects():
            if project["name"] == name:
                return project["id"]
        return self.client.create_project(name, task_type, overlap=1)["id"]

    def n_items(self, project_id: int) -> int:
        """Items already in the project."""
        return self.client.stats(project_id)["n_items"]

    def add_items(self, project_id: int, items: list[dict]) -> None:
        """Add comparison items, in requests the API accepts (each one transaction, in order)."""
        for start in range(0, len(items), ITEMS_PER_REQUEST):
            self.client.add_items(project_id, items[start : start + ITEMS_PER_REQUEST])

    def progress(self, project_id: int) -> dict[str, int]:
        """n_items, n_items_complete, n_labels."""
        stats = self.client.stats(project_id)
        return {k: stats[k] for k in ("n_items", "n_items_complete", "n_labels")}

    def raw_rows(self, project_id: int) -> list[dict[str, Any]]:
        """Every label as a raw export row, downloaded."""
        return self.client.export(project_id, "raw")

    def annotation_target(self, names: Sequence[str], run: Run) -> Any:
        """HttpAnnotators for the simulated pool, creating their accounts through invites when new.

        Their passwords are generated once and kept in RUN/loop/simulated_accounts.json (mode 600).
        """
        from rlhfkit.feedback.client import FeedbackClient, FeedbackClientError, HttpAnnotators

        path = run.dir / LOOP_DIR / "simulated_accounts.json"
        accounts = json.loads(path.read_text()) if path.is_file() else {}
        known = accounts.get(self.url, {})
        for name in names:
            if name in known:
                continue
            password = secrets.token_urlsafe(18)
            try:
                FeedbackClient(self.url).signup(self.client.create_invite("annotator"), name, password)
            except FeedbackClientError as exc:
                raise StageError(
                    f"feedback service {self.url}: cannot create the simulated annotator {name!r} "
                    f"({exc.detail}); if that user exists already, its password is not in {path}: "
                    "rename the pool's annotators or use a fresh service database"
                ) from None
            known[name] = password
            accounts[self.url] = known
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(accounts, indent=2))
            path.chmod(0o600)
        return HttpAnnotators(self.url, {n: known[n] for n in names})

    def close(self) -> None:
        """Nothing to close: each call is its own HTTP request."""


def open_feedback(run: Run, k: int) -> StoreFeedback | ServiceFeedback:
    """Where round K's comparisons go: the service at loop.feedback_url, else the run's store."""
    cfg = run.config.loop
    if cfg.feedback_url is None:
        return StoreFeedback(run, seed=run.config.seed + 1000 * k)
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        raise StageError(
            f"loop.feedback_url is set: put the password of the service's admin user "
            f"{cfg.feedback_user!r} (loop.feedback_user) in the environment variable {PASSWORD_ENV}"
        )
    return ServiceFeedback(cfg.feedback_url, cfg.feedback_user, password)


def pairs_so_far(run: Run, last_round: int) -> list[dict]:
    """The pairs the first `last_round` rounds collected: the RM stage's, then each round's."""
    pairs = _training_pairs(run)
    for k in range(2, last_round + 1):
        pairs += _read_pairs(round_dir(run, k) / "pairs.jsonl")
    return pairs


def _policy_path(run: Run, summary: Mapping[str, Any]) -> Path:
    return run.dir / summary["policy"]


LLMJudge = Callable[[Sequence[Any], Sequence[str]], list[float]]


def evaluate_round(
    run: Run, policy: Path, reward: Path, name: str, llm_judge: Callable[[], LLMJudge] | None = None
) -> dict[str, Any]:
    """The policy against SFT on the held-out prompts, and the RM on gold-labelled SFT pairs.

    Same seed and prompts every round: the SFT samples and the RM benchmark pairs are the same
    ones, so the rounds' numbers differ only by their models. `llm_judge` gives the LLM judge
    (eval.judge llm), loaded once for all rounds; unset, the round loads its own.
    """
    from rlhfkit.eval import evaluate
    from rlhfkit.eval.rm_bench import rm_benchmark

    cfg = run.config.eval
    sft = run.model_path("sft")
    prompts = _prompts(run.config.data.heldout_prompts, run.task.heldout_prompts)[: cfg.n_prompts]
    gold = resolve_gold(run.task) if run.task.gold else None
    # The configured judge; a task without a gold utility has the round's RM judge instead of gold.
    judge = "rm" if cfg.judge == "gold" and gold is None else cfg.judge
    result = evaluate.evaluate_policies(
        {"sft": sft, name: policy},
        "sft",
        reward,
        prompts,
        gold,
        seed=run.config.seed,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        n_samples=cfg.n_samples,
        judge=judge,
        ci_method=cfg.ci_method,
        llm_judge=(llm_judge or (lambda: evaluate.load_llm_judge(cfg.judge_model)))()
        if judge == "llm"
        else None,
    )
    entry = result["eval"]["policies"][name]
    figures: dict[str, Any] = {
        "gold_reward": entry.get("gold_reward"),
        "proxy_reward": entry.get("proxy_reward"),
        "kl_from_sft": entry.get("kl_from_sft"),
        "win_rate_vs_sft": result["eval"]["win_rate_vs_sft"][name],
        "judge": result["eval"]["judge"],
        "judge_model": result["eval"].get("judge_model"),
        "sft_gold_reward": result["eval"]["policies"]["sft"].get("gold_reward"),
        "rm_heldout_accuracy": None,
    }
    if judge == "llm":
        figures["llm_score"] = entry.get("llm_score")
    if gold is not None and cfg.heldout_pairs:
        bench = rm_benchmark(
            sft,
            reward,
            prompts,
            gold,
            n_pairs=cfg.heldout_pairs,
            seed=run.config.seed,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
        )
        figures["rm_heldout_accuracy"] = bench["accuracy"]
    return {**figures, "samples": result["samples"]}


def _first_round(run: Run, fingerprint: str, llm_judge: Callable[[], LLMJudge]) -> dict[str, Any]:
    """Round 1: the demo's feedback, rm and ppo stages, evaluated like every later round."""
    watch = Stopwatch()
    feedback = json.loads((run.stage_dir("feedback") / "summary.json").read_text())
    rm = json.loads((run.stage_dir("rm") / "summary.json").read_text())
    pairs = _training_pairs(run)
    figures = evaluate_round(run, run.model_path("ppo"), run.model_path("rm"), "round-1", llm_judge)
    samples = figures.pop("samples")
    out = round_dir(run, 1)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "samples.jsonl", samples)
    return {
        "round": 1,
        "fingerprint": fingerprint,
        "policy": "ppo/model",
        "rm": "rm/model",
        "pairs": str(_preference_path(run)),
        "source": "feedback stage",
        "n_items": feedback.get("n_items"),
        "n_labels": feedback["n_labels"],
        "n_labels_total": feedback["n_labels"],
        "n_pairs": len(pairs),
        "n_pairs_total": len(pairs),
        "rm_val_accuracy": rm.get("val_accuracy"),
        **figures,
        "wall_seconds": watch.seconds(),
    }


def _later_round(
    run: Run, k: int, previous: Mapping[str, Any], fingerprint: str, llm_judge: Callable[[], LLMJudge]
) -> dict[str, Any]:
    """Round K >= 2: sample from the current policy, collect labels, aggregate, RM, PPO, evaluate."""
    from rlhfkit.crowd.aggregate import aggregate_pairs
    from rlhfkit.crowd.simulate import simulate_annotation
    from rlhfkit.train.ppo import run_ppo
    from rlhfkit.train.rm import run_rm

    cfg, fb, watch = run.config.loop, run.config.feedback, Stopwatch()
    out = round_dir(run, k)
    out.mkdir(parents=True, exist_ok=True)
    current = _policy_path(run, previous)
    gold = resolve_gold(run.task) if run.task.gold else None
    if cfg.annotators == "simulated" and gold is None:
        raise StageError(
            f"task {run.task.name!r} has no gold utility for simulated annotators: "
            "set loop.annotators=human and let people label"
        )
    pool = simulated_pool(run) if cfg.annotators == "simulated" else []
    earlier = pairs_so_far(run, k - 1)
    project_name = f"{fb.project}-loop{k}-{fingerprint[:8]}"
    source = open_feedback(run, k)
    try:
        project = source.project(project_name, fb.task_type)
        # The round's comparisons are saved before any is sent: an attempt cut off between two
        # requests left the first items in the project, and the next one sends the rest.
        items_file = out / f"items-{fingerprint[:8]}.jsonl"
        n_sent = source.n_items(project)
        # A project that has items but no saved list was interrupted after sending them all
        # (a run directory of an earlier version): keep its items and labels.
        if n_sent == 0 and not items_file.is_file():
            rng = random.Random(f"loop-{run.config.seed}-{k}")
            prompts = pick_prompts(
                _prompts(run.config.data.prompts, run.task.train_prompts),
                [p["prompt"] for p in earlier],
                cfg.prompts_per_round or fb.n_prompts,
                rng,
            )
            partner = (run.model_path("sft"), "sft/model") if cfg.compare_with == "sft" else None
            items = comparison_items(
                current, prompts, fb, run.config.seed + k, rng, str(current.relative_to(run.dir)), partner
            )
            if not items:
                raise StageError(f"round {k}: every prompt's samples were identical; nothing to compare")
            write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in prompts])
            write_jsonl(items_file, items)
        if items_file.is_file():
            items = read_jsonl(items_file)
            if n_sent < len(items):
                source.add_items(project, items[n_sent:])
                console.print(
                    f"round {k}: {len(items) - n_sent} of {len(items)} comparisons of "
                    f"{current.relative_to(run.dir)} sent to project {project_name!r} at {source.where}",
                    highlight=False,
                )
        if cfg.annotators == "simulated":
            target = source.annotation_target([p.name for p in pool], run)
            simulate_annotation(target, project, pool, gold, seed=run.config.seed + k)
        progress = wait_for_labels(
            lambda: source.progress(project),
            cfg.min_complete,
            cfg.label_timeout,
            cfg.poll_seconds,
            f"round {k}, project {project_name!r} at {source.where}",
        )
        raw = source.raw_rows(project)
    finally:
        source.close()
    write_jsonl(out / "raw.jsonl", raw)
    votes, items = votes_from_raw(raw)
    # Every round's pairs are made the same way as round 1's unless the loop says otherwise.
    method = cfg.aggregate or fb.aggregate
    aggregated = aggregate_pairs(
        items, votes, method, f"loop:round-{k}", seed=run.config.seed, margin=fb.margin
    )
    rows = aggregated.rows
    if not rows:
        raise StageError(f"round {k}: the labels of project {project_name!r} gave no preference pair")
    write_jsonl(out / "pairs.jsonl", rows)
    pairs = earlier + _read_pairs(out / "pairs.jsonl")

    sft = run.model_path("sft")
    rm = run_rm(
        run.config,
        sft,
        pairs,
        out / "rm",
        run.show_progress,
        **run.checkpointing("rm", out / "rm", fingerprint),
    )
    steps = cfg.ppo_steps if cfg.ppo_steps is not None else run.config.ppo.steps
    config = run.config.model_copy(update={"ppo": run.config.ppo.model_copy(update={"steps": steps})})
    ptx = run.config.ppo.ptx_coef > 0
    if ptx and not run.task.corpus:
        raise StageError(f"ppo.ptx_coef > 0 needs a pretraining corpus; task {run.task.name!r} has none")
    # Rounds 2..N sample new comparisons from the current policy either way; `ppo_from` says
    # whether RL then starts again from SFT against the better reward model (Anthropic retrained
    # its policies on all data so far) or goes on from the current policy, whose drift from SFT
    # then adds up round after round under one KL penalty.
    start = sft if cfg.ppo_from == "sft" else current
    ppo = run_ppo(
        config,
        start,
        out / "rm" / "model",
        _prompts(run.config.data.prompts, run.task.train_prompts),
        out / "ppo",
        run.show_progress,
        ptx_corpus=run.task.corpus if ptx else None,
        reference_path=sft,
        **run.checkpointing("ppo", out / "ppo", fingerprint),
    )
    figures = evaluate_round(run, out / "ppo" / "model", out / "rm" / "model", f"round-{k}", llm_judge)
    write_jsonl(out / "samples.jsonl", figures.pop("samples"))
    return {
        "round": k,
        "fingerprint": fingerprint,
        "policy": str((out / "ppo" / "model").relative_to(run.dir)),
        "rm": str((out / "rm" / "model").relative_to(run.dir)),
        "sampled_from": str(current.relative_to(run.dir)),
        "pairs": str((out / "pairs.jsonl").relative_to(run.dir)),
        "source": source.where,
        "project": project_name,
        "aggregate": method,
        "n_items": progress["n_items"],
        "n_labels": len(raw),
        "n_labels_total": previous["n_labels_total"] + len(raw),
        "n_pairs": len(rows),
        # Items that made no pair: no winner, or a winner between two identical responses.
        "n_undecided": aggregated.n_undecided,
        "n_identical_skipped": aggregated.n_identical,
        "n_pairs_total": len(pairs),
        "rm_train_pairs": rm["n_train_pairs"],
        "rm_val_accuracy": rm.get("val_accuracy"),
        "ppo_steps": steps,
        "ppo_from": cfg.ppo_from,
        "ppo_wall_seconds": ppo.get("wall_seconds"),
        **figures,
        "wall_seconds": watch.seconds(),
    }


def _finished(run: Run, k: int, fingerprint: str) -> dict[str, Any] | None:
    path = round_dir(run, k) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("fingerprint") == fingerprint else None


def loop_config(config: RunConfig) -> RunConfig:
    """The loop's config: round 1's feedback stage collects `loop.prompts_per_round` prompts too."""
    n = config.loop.prompts_per_round
    if n is None or n == config.feedback.n_prompts:
        return config
    return config.model_copy(update={"feedback": config.feedback.model_copy(update={"n_prompts": n})})


def run_loop(run: Run) -> dict[str, Any]:
    """The demo's stages up to the first PPO, then rounds 2..N; returns report.json's content."""
    config = loop_config(run.config)
    if config is not run.config:  # the run directory's config.yaml says what the loop ran
        run = Run(run.dir, config, run.show_progress, run.resume, run.restart_changed)
    if run.config.eval.judge == "llm" and not run.config.eval.judge_model:
        # Every round is judged by it: say so now, not after round 1's training.
        raise StageError(
            "eval.judge is 'llm' but eval.judge_model is not set: give the LLM judge's model "
            "folder or hub id, or set eval.judge=gold"
        )
    if run.config.loop.rounds > 1 and run.config.loop.annotators == "simulated":
        simulated_pool(run)  # a pool too small for the rounds is refused now, not after round 1
    for stage in ("pretrain", "sft", "feedback", "rm", "ppo"):
        if stage == "pretrain" and run.config.model.name_or_path:
            continue
        run_stage(run, stage, reuse=True)
    from rlhfkit.eval import evaluate

    # The LLM judge is the same model every round: loaded by the first round that evaluates, kept.
    llm_judge = functools.cache(lambda: evaluate.load_llm_judge(run.config.eval.judge_model))
    rounds: list[dict[str, Any]] = []
    rerun = False  # once a round runs again, the rounds built on it must too
    for k in range(1, run.config.loop.rounds + 1):
        fingerprint = round_fingerprint(run, k)
        summary = None if rerun else _finished(run, k, fingerprint)
        if summary is not None:
            console.print(f"[dim]loop: reusing the finished round {k} in {round_dir(run, k)}[/dim]")
        else:
            rerun = True
            path = round_dir(run, k) / "summary.json"
            path.unlink(missing_ok=True)
            if k == 1:
                summary = _first_round(run, fingerprint, llm_judge)
            else:
                summary = _later_round(run, k, rounds[-1], fingerprint, llm_judge)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2))
            win = summary["win_rate_vs_sft"]
            console.print(
                f"[bold]loop round {k}[/bold] done in {summary['wall_seconds']:.0f}s: "
                f"labels={summary['n_labels_total']}, pairs={summary['n_pairs_total']}, "
                f"rm_heldout_accuracy={summary['rm_heldout_accuracy']}, gold={summary['gold_reward']}, "
                f"kl={summary['kl_from_sft']}, win_rate_vs_sft={win['rate']:.3f} "
                f"(judge {summary.get('judge', 'gold')})",
                highlight=False,
            )
        rounds.append(summary)
        report = record_rounds(run, rounds)
    return report


def record_rounds(run: Run, rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Put the rounds in report.json (loop.rounds, one stage timing each) and in report.html."""
    from rlhfkit.eval.report import write_html_report

    entries = [{key: summary.get(key) for key in ROUND_KEYS} for summary in rounds]
    for entry, summary in zip(entries, rounds, strict=True):
        entry["policy"] = summary["policy"]
    stages = {
        f"loop/round-{s['round']}": {
            "wall_seconds": s["wall_seconds"],
            "n_pairs_total": s["n_pairs_total"],
        }
        for s in rounds
        if s["round"] > 1  # round 1's time is in the feedback, rm and ppo stages
    }
    report = run.update_report({"loop": {"rounds": entries}, "stages": stages})
    write_html_report(run.dir, report)
    return report
