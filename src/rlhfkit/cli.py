"""The `rlhfkit` command: one subcommand per stage, plus the demo and feedback tools."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from rlhfkit.config import PRESETS, ConfigError, RunConfig, dump_commented, load_config
from rlhfkit.data.io import DataError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Reinforcement learning from human feedback, end to end."
)
feedback_app = typer.Typer(no_args_is_help=True, help="The feedback store: collect, export.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
app.add_typer(feedback_app, name="feedback")
feedback_user_app = typer.Typer(no_args_is_help=True, help="Users of the feedback service.")
feedback_app.add_typer(feedback_user_app, name="user")
app.add_typer(config_app, name="config")
console = Console()
# soft_wrap: an error naming a long path must stay on one line, greppable.
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: KEY=VALUE, e.g. ppo.kl_coef=0.1")]
PresetOpt = Annotated[str, typer.Option(help=f"base settings: {', '.join(PRESETS)}")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="hide progress bars")]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="continue the training stage from its newest checkpoint in --out (made with the same config)",
    ),
]


def _fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit with status 2."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    raise typer.Exit(code=2)


def _interrupted(exc: Exception, again: str, out: Path) -> NoReturn:
    """A run stopped by SIGINT/SIGTERM after its checkpoint: say how to continue, exit 130."""
    err_console.print(
        f"[yellow]{escape(str(exc))}[/yellow]\n"
        f"continue with: rlhfkit {again} --out {out} (same --config/--set)",
        highlight=False,
    )
    raise typer.Exit(code=130)


def _load(config: Path | None, sets: list[str] | None, preset: str) -> RunConfig:
    try:
        return load_config(config, sets or [], preset)
    except ConfigError as exc:
        _fail(str(exc))


def _run_stages(
    stage_names: tuple[str, ...],
    out: Path,
    config: Path | None,
    sets: list[str] | None,
    preset: str,
    no_progress: bool,
    reuse: bool,
    resume: bool = False,
) -> None:
    from rlhfkit.eval.report import summary_table
    from rlhfkit.pipeline import Run, StageError, run_demo, run_stage
    from rlhfkit.train.checkpoint import TrainingInterrupted

    cfg = _load(config, sets, preset)
    try:
        # The demo reuses finished stages and resumes an interrupted one.
        run = Run(out, cfg, show_progress=not no_progress, resume=resume or reuse, restart_changed=reuse)
        if len(stage_names) > 1:
            report = run_demo(run, stage_names)
        else:
            run_stage(run, stage_names[0], reuse=reuse)
            report = run.read_report()
    except TrainingInterrupted as exc:
        # The command that was run: a stage's nested training (eval's label curves) names its own.
        _interrupted(exc, "demo" if len(stage_names) > 1 else f"{stage_names[0]} --resume", out)
    except (DataError, StageError, ValueError) as exc:
        _fail(str(exc))
    except OSError as exc:  # a hub id that cannot be fetched (no network), a file that cannot be read
        _fail(str(exc).splitlines()[0] if str(exc) else repr(exc))
    if report.get("eval", {}).get("policies"):
        console.print(summary_table(report))
        console.print(f"run directory: {out}  (report.json, report.html)")


def _stage_command(stage: str, doc: str, checkpoints: bool = True) -> None:
    """A command that runs one stage; `--resume` is refused where the stage writes no checkpoints."""

    def command(
        config: ConfigOpt = None,
        set_: SetOpt = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/demo"),
        preset: PresetOpt = "default",
        no_progress: NoProgressOpt = False,
        resume: ResumeOpt = False,
    ) -> None:
        if resume and not checkpoints:
            _fail(f"--resume: {stage} writes no checkpoints, so there is nothing to continue; run it again")
        _run_stages((stage,), out, config, set_, preset, no_progress, reuse=False, resume=resume)

    command.__doc__ = doc + ("" if checkpoints else " It writes no checkpoints (no --resume).")
    app.command(stage)(command)


_stage_command("pretrain", "Train a tokenizer and pretrain a tiny causal LM from scratch.")
_stage_command("sft", "Supervised fine-tuning on demonstrations.")
_stage_command("rm", "Train the reward model on preference pairs.")
_stage_command("ppo", "Optimise the SFT policy against the reward model with PPO.")
_stage_command("dpo", "Direct preference optimisation (DPO, IPO, conservative DPO) on the preference pairs.")
_stage_command("kto", "KTO on thumbs-up/down data (data.unpaired, or derived from the preference pairs).")
_stage_command("grpo", "GRPO / Dr. GRPO: G samples per prompt, group-relative advantages, no critic.")
_stage_command("rloo", "RLOO (leave-one-out baseline) or REINFORCE++ (rloo.advantage=reinforce_pp).")
_stage_command(
    "bon",
    "Best-of-n from the SFT policy on held-out prompts, judged with its analytic KL.",
    checkpoints=False,
)
_stage_command(
    "expert_iter",
    "Expert iteration: fine-tune on the best of n samples, for a few rounds.",
    checkpoints=False,
)


@app.command()
def compare(
    algos: Annotated[
        str, typer.Option(help="comma-separated methods")
    ] = "sft,bon,expert_iter,ppo,dpo,kto,grpo,rloo",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/compare"),
    preset: PresetOpt = "default",
    no_progress: NoProgressOpt = False,
) -> None:
    """Train each method from the same SFT model and feedback; judge all against SFT."""
    from rlhfkit.compare import compare_table, parse_algos, run_compare
    from rlhfkit.pipeline import Run, StageError
    from rlhfkit.train.checkpoint import TrainingInterrupted

    if not any(name.strip() for name in algos.split(",")):
        _fail("--algos is empty: give methods to compare with SFT, comma-separated")
    try:
        names = parse_algos(algos)
    except ValueError as exc:
        _fail(str(exc))
    cfg = _load(config, set_, preset)
    try:
        # As the demo: finished stages are reused, an interrupted one resumes (or starts over if changed).
        run = Run(out, cfg, show_progress=not no_progress, resume=True, restart_changed=True)
        result = run_compare(run, names)
    except TrainingInterrupted as exc:
        _interrupted(exc, f"compare --algos {algos}", out)
    except (DataError, StageError, ValueError) as exc:
        _fail(str(exc))
    console.print(compare_table(result))
    console.print(f"wrote {out / 'compare.json'}")


def _run_config(out: Path, config: Path | None) -> Path | None:
    """The config a tool on an existing run uses: --config, else the run's own config.yaml."""
    if config is None and (out / "config.yaml").is_file():
        return out / "config.yaml"
    return config


@app.command("convert")
def convert_command(
    from_: Annotated[
        str,
        typer.Option(
            "--from", help="hh (Anthropic HH-RLHF), hh-chat (the same, prompts as chat messages) or summarize"
        ),
    ],
    in_: Annotated[
        Path,
        typer.Option("--in", help="the rows: .jsonl, .json, .parquet, a dataset folder or hf:NAME:SPLIT"),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="TRL preference pairs to write (.jsonl)")],
    skip_bad_rows: Annotated[
        bool,
        typer.Option(
            "--skip-bad-rows",
            help="leave out rows that cannot be converted, counted by reason (else the first is an error)",
        ),
    ] = False,
) -> None:
    """Convert a public preference data set to TRL pairs (for data.preferences)."""
    from rlhfkit.data.convert import CONVERTERS, convert_file, pairs_to_trl_rows
    from rlhfkit.data.io import write_jsonl

    if from_ not in CONVERTERS:
        _fail(f"--from {from_!r}: choose one of {', '.join(CONVERTERS)}")
    _out_file(out)
    skipped: dict[str, list[int]] | None = {} if skip_bad_rows else None
    try:
        n = write_jsonl(out, pairs_to_trl_rows(convert_file(in_, from_, skipped)))
    except DataError as exc:
        _fail(str(exc))
    console.print(f"wrote {n} pairs to {out}", highlight=False)
    for reason, numbers in sorted((skipped or {}).items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")
        console.print(f"skipped {len(numbers)} rows: {escape(reason)} (rows {shown})", highlight=False)


@app.command("eval")
def eval_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/demo"),
    policies: Annotated[
        str | None, typer.Option(help="comma-separated stage names (sft,ppo,dpo) or model folders")
    ] = None,
    judge: Annotated[str | None, typer.Option(help="gold, rm or llm (set eval.judge_model)")] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="policy the others are compared with: its name, or the folder as in --policies"),
    ] = None,
    ci: Annotated[str | None, typer.Option("--ci", help="win-rate interval: wilson or bootstrap")] = None,
    preset: PresetOpt = "default",
    no_progress: NoProgressOpt = False,
) -> None:
    """Judge the policies of a run; write report.json and report.html.

    Without --config it reads the run's own config.yaml, so a run is judged as it was made.
    """
    sets = list(set_ or [])
    if policies is not None:
        names = [p.strip() for p in policies.split(",") if p.strip()]
        if not names:
            _fail("--policies is empty: give stage names or model folders, comma-separated")
        sets.append(f"eval.policies={json.dumps(names)}")
    for key, value in (("judge", judge), ("reference", reference), ("ci_method", ci)):
        if value is not None:
            sets.append(f"eval.{key}={json.dumps(value)}")
    _run_stages(("eval",), out, _run_config(out, config), sets, preset, no_progress, reuse=False)


@app.command()
def overopt(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory with sft/ and rm/ models")] = Path(
        "runs/demo"
    ),
    rm: Annotated[
        list[Path] | None,
        typer.Option("--rm", help="another proxy RM folder, repeatable; named like eval's policy folders"),
    ] = None,
    checkpoint: Annotated[
        list[Path] | None, typer.Option("--checkpoint", help="policy folder for the RL sweep (repeatable)")
    ] = None,
    preset: PresetOpt = "default",
    no_progress: NoProgressOpt = False,
) -> None:
    """Reward over-optimisation: gold and proxy reward against sqrt(KL) for best-of-n and RL checkpoints."""
    from rlhfkit.eval.overopt import (
        checkpoint_paths,
        reward_model_paths,
        run_overopt,
        saved_checkpoints,
        summary_rows,
    )
    from rlhfkit.eval.report import write_html_report
    from rlhfkit.pipeline import Run, StageError, _prompts
    from rlhfkit.tasks import resolve_gold
    from rlhfkit.train.loop import Stopwatch, progress_bar

    cfg = _load(_run_config(out, config), set_, preset)
    ocfg, watch = cfg.overopt, Stopwatch()
    try:
        run = Run(out, cfg, show_progress=not no_progress)
        if not run.task.gold:
            _fail(f"task {run.task.name!r} has no gold utility: over-optimisation needs a gold judge")
        reward_paths = reward_model_paths(run.model_path("rm"), [*ocfg.reward_models, *(rm or [])])
        folders = list(checkpoint or ocfg.checkpoints) or saved_checkpoints(run.stage_dir("ppo"))
        # Named as `eval` names policy folders; two runs' step-20 keep both (a ValueError names a
        # folder without a saved model).
        checkpoints = checkpoint_paths(folders)
        # The held-out prompts eval judges on: data.heldout_prompts when set, else the task's.
        prompts = _prompts(cfg.data.heldout_prompts, run.task.heldout_prompts)[: ocfg.n_prompts]
        total = len(prompts) * ocfg.samples_per_prompt
        with progress_bar("best-of-n samples", total, enabled=not no_progress) as bar:
            result = run_overopt(
                run.stage_dir("overopt"),
                run.model_path("sft"),
                reward_paths,
                checkpoints,
                prompts,
                resolve_gold(run.task),
                samples_per_prompt=ocfg.samples_per_prompt,
                seed=cfg.seed,
                temperature=ocfg.temperature,
                max_new_tokens=ocfg.max_new_tokens,
                on_batch=lambda k: bar.advance(bar.task_ids[0], k),
            )
        result["wall_seconds"] = watch.seconds()
        timing = {"overopt": {"wall_seconds": result["wall_seconds"]}}
        report = run.update_report({"overopt": result, "stages": timing}, replace=("overopt",))
        run.record_config()
        write_html_report(run.dir, report)
    except (DataError, StageError, ValueError) as exc:
        _fail(str(exc))
    for line in summary_rows(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"plot: {result.get('plot')}  (and in {out / 'report.html'})", markup=False, soft_wrap=True)


@app.command()
def demo(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/demo"),
    preset: PresetOpt = "default",
    no_progress: NoProgressOpt = False,
) -> None:
    """The whole loop on the built-in task: pretrain, SFT, feedback, RM, PPO, eval."""
    from rlhfkit.pipeline import STAGES

    _run_stages(STAGES, out, config, set_, preset, no_progress, reuse=True)


@app.command("loop")
def loop_command(
    rounds: Annotated[int | None, typer.Option(help="rounds (loop.rounds); round 1 is the demo's")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/loop"),
    preset: PresetOpt = "default",
    feedback_url: Annotated[
        str | None,
        typer.Option(help="feedback service URL (loop.feedback_url); password in RLHFKIT_FEEDBACK_PASSWORD"),
    ] = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Online iterated RLHF: sample the current policy, collect labels, retrain the RM, PPO, repeat."""
    from pydantic import ValidationError
    from rich.table import Table

    from rlhfkit.loop import run_loop
    from rlhfkit.pipeline import Run, StageError
    from rlhfkit.train.checkpoint import TrainingInterrupted

    cfg = _load(config, set_, preset)
    flags = (("--rounds", "rounds", rounds), ("--feedback-url", "feedback_url", feedback_url))
    for flag, key, value in flags:
        try:
            if value is not None:
                setattr(cfg.loop, key, value)
        except ValidationError as exc:
            _fail(f"{flag} {value}: {exc.errors()[0]['msg']}")
    try:
        report = run_loop(Run(out, cfg, show_progress=not no_progress, resume=True, restart_changed=True))
    except TrainingInterrupted as exc:
        _interrupted(exc, "loop", out)
    except (DataError, StageError, ValueError) as exc:
        # LabelTimeout is a StageError: its message says how far labelling got and what to do.
        _fail(str(exc))
    table = Table(title="Iterated RLHF: each round's policy vs SFT", title_justify="left")
    columns = ("round", "labels so far", "RM held-out acc.", "gold reward", "KL from SFT", "win rate vs SFT")
    for column in columns:
        table.add_column(column, justify="right")
    for r in report["loop"]["rounds"]:
        win = r["win_rate_vs_sft"]
        table.add_row(
            str(r["round"]),
            str(r["n_labels_total"]),
            "-" if r["rm_heldout_accuracy"] is None else f"{r['rm_heldout_accuracy']:.3f}",
            "-" if r["gold_reward"] is None else f"{r['gold_reward']:.3f}",
            f"{r['kl_from_sft']:.3f}",
            f"{win['rate']:.3f} [{win['ci95'][0]:.3f}, {win['ci95'][1]:.3f}]",
        )
    console.print(table)
    # The rm judge is each round's own reward model; an LLM judge is named by its model.
    judges = dict.fromkeys(
        (r.get("judge") or "gold") + (f" ({r['judge_model']})" if r.get("judge") == "llm" else "")
        for r in report["loop"]["rounds"]
    )
    console.print(f"win rates judged by: {', '.join(judges)}", highlight=False)
    console.print(f"run directory: {out}  (report.json loop.rounds, report.html)")


@feedback_app.command("simulate")
def feedback_simulate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/demo"),
    preset: PresetOpt = "default",
    no_progress: NoProgressOpt = False,
) -> None:
    """Sample SFT completions into the store; simulated annotators label them; export pairs."""
    _run_stages(("feedback",), out, config, set_, preset, no_progress, reuse=False)


def _warn_about_scrypt_cost() -> None:
    """Warn while password hashes get test-suite parameters (RLHFKIT_FEEDBACK_SCRYPT_COST); fail if bad."""
    from rlhfkit.feedback.auth import SCRYPT_COST_ENV, scrypt_cost

    try:
        n, r, p = scrypt_cost()
    except ValueError as exc:
        _fail(str(exc))
    if SCRYPT_COST_ENV in os.environ:
        err_console.print(
            f"[bold yellow]warning:[/bold yellow] {SCRYPT_COST_ENV} is set: new password hashes use "
            f"scrypt N={n}, r={r}, p={p} instead of the production setting; unset it outside tests",
            highlight=False,
        )


def _open_store(db: str, durable: bool = True, existing: bool = False):
    """A FeedbackStore on `db`, or a CLI error naming the problem. `existing`: a command that only
    reads refuses a SQLite file that is not there, instead of creating an empty database."""
    from sqlalchemy.exc import SQLAlchemyError

    from rlhfkit.feedback.store import FeedbackStore

    try:
        return FeedbackStore(db, durable=durable, create=not existing)
    except (SQLAlchemyError, ValueError, OSError) as exc:
        _fail(f"--db {db!r}: cannot open the feedback database: {str(exc).splitlines()[0]}")


def _out_file(out: Path, flag: str = "--out") -> None:
    """Refuse a path that cannot be written as a file (a directory, or one under a file), before any work."""
    if out.is_dir():
        _fail(f"{flag} {out}: a directory; give the path of the file to write")
    # Missing folders are made when the file is written; one that is a file never can be.
    there = next((parent for parent in out.parents if parent.exists()), None)
    if there is not None and not there.is_dir():
        _fail(f"{flag} {out}: {there} is a file, not a folder")


DbOpt = Annotated[str, typer.Option(help="database URL (postgresql://...) or SQLite file")]


@feedback_app.command("export")
def feedback_export(
    db: DbOpt,
    project: Annotated[str, typer.Option(help="project name")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output JSONL file")],
    format_: Annotated[
        str, typer.Option("--format", help="trl-preference, trl-unpaired, sft or raw")
    ] = "trl-preference",
) -> None:
    """Export a project's labels as training data (excluded annotators and golden items left out)."""
    from rlhfkit.feedback.exports import EXPORT_FORMATS

    if format_ not in EXPORT_FORMATS:
        _fail(f"--format {format_!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    _out_file(out)
    store = _open_store(db, existing=True)
    skipped: dict[str, int] = {}
    try:
        n = store.export(store.project_id(project), out, format_, skipped=skipped)
    except KeyError as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
    except ValueError as exc:
        _fail(f"--format {format_}: {exc}")
    finally:
        store.close()
    identical = skipped.get("identical_responses", 0)
    note = f" ({identical} decided items skipped: their two responses are the same text)" if identical else ""
    console.print(f"wrote {n} rows to {out}{note}")


@feedback_app.command("serve")
def feedback_serve(
    db: Annotated[str, typer.Option(help="database URL or SQLite file")] = "feedback.db",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    secure_cookies: Annotated[
        bool, typer.Option("--secure-cookies", help="mark cookies Secure (behind an HTTPS proxy)")
    ] = False,
    session_idle_minutes: Annotated[
        float,
        typer.Option(
            min=0,
            help="end a session after this many minutes without a request (0: only the 12-hour limit)",
        ),
    ] = 30.0,  # feedback.session.SESSION_IDLE_SECONDS, not imported: it would load FastAPI for every command
    trusted_proxy: Annotated[
        list[str] | None,
        typer.Option(
            "--trusted-proxy",
            help="address or network (CIDR) of a reverse proxy in front of the service, repeatable: the "
            "client address that login and sign-up limits count per is read from X-Forwarded-For on its "
            "requests only",
        ),
    ] = None,
) -> None:
    """Run the annotation web service (pages, JSON API; its OpenAPI spec at /openapi.json)."""
    import uvicorn

    from rlhfkit.feedback.app import create_app

    _warn_about_scrypt_cost()
    store = _open_store(db)
    if not store.users():
        err_console.print("no users yet: create an admin with `rlhfkit feedback user add NAME --role admin`")
    try:
        try:
            app = create_app(
                store,
                secure_cookies=secure_cookies,
                session_idle_seconds=session_idle_minutes * 60 if session_idle_minutes > 0 else None,
                trusted_proxies=trusted_proxy or (),
            )
        except ValueError as exc:
            _fail(f"--trusted-proxy: {exc}")
        console.print(f"feedback service on http://{host}:{port}  (database: {store.url})")
        # The app alone decides whose X-Forwarded-For to believe (--trusted-proxy); uvicorn's own
        # default would believe any client on 127.0.0.1, so a local client could name itself any
        # address and slip past the per-address limits.
        uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)
    finally:
        store.close()


@feedback_user_app.command("add")
def feedback_user_add(
    name: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[str, typer.Option(help="admin or annotator")] = "annotator",
    db: Annotated[str, typer.Option(help="database URL or SQLite file")] = "feedback.db",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from the first line of stdin")
    ] = False,
) -> None:
    """Create a user who can log in to the feedback service."""
    from rlhfkit.feedback.auth import check_password_rules
    from rlhfkit.feedback.store import ROLES

    if role not in ROLES:
        _fail(f"--role {role!r}: choose admin or annotator")
    _warn_about_scrypt_cost()
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        check_password_rules(password)
    except ValueError as exc:
        _fail(str(exc))
    store = _open_store(db)
    try:
        store.add_user(name, role, password)
    except ValueError as exc:
        _fail(str(exc))
    finally:
        store.close()
    console.print(f"created {role} {name!r}")


@feedback_app.command("import")
def feedback_import(
    db: DbOpt,
    project: Annotated[str, typer.Option(help="project name (created if missing, with --task-type)")],
    file: Annotated[
        Path | None,
        typer.Option(help='JSONL, JSON list, Parquet or dataset of {"prompt", "completions": [...]}'),
    ] = None,
    raw: Annotated[
        Path | None,
        typer.Option(
            help="a raw export (feedback export --format raw): recreate its items, annotators and "
            "labels as the new project --project"
        ),
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="checkpoint to sample completions from")] = None,
    prompts: Annotated[Path | None, typer.Option(help='with --policy: JSONL of {"prompt"}')] = None,
    k: Annotated[int, typer.Option("-k", help="with --policy: completions per prompt")] = 2,
    task_type: Annotated[
        str | None,
        typer.Option(help="task type of a new project (default comparison); an existing one's must match"),
    ] = None,
    overlap: Annotated[int, typer.Option(help="annotators per item of a new project")] = 1,
    guidelines: Annotated[Path | None, typer.Option(help="Markdown guidelines of a new project")] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    max_file_mb: Annotated[
        float,
        typer.Option(
            min=0,
            help="refuse a --file or --raw larger than this (it is read whole into memory; 0: no limit)",
        ),
    ] = 1024.0,  # importing.MAX_IMPORT_BYTES, not imported: it would load the store for --help
) -> None:
    """Add items to a project from a JSONL file, or by sampling a local policy checkpoint; or recreate
    a project, labels and all, from a raw export.

    A new project is created with its items in one transaction: a failure leaves no project behind.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from rlhfkit.data.io import read_records
    from rlhfkit.feedback.importing import (
        check_import_size,
        items_not_in,
        line_to_items,
        read_import_file,
        read_raw_file,
        sample_items,
    )
    from rlhfkit.feedback.store import TASK_TYPES, ItemError, validate_item

    if sum(source is not None for source in (file, raw, policy)) != 1:
        _fail("give one of --file, --raw, or --policy (with --prompts)")
    if policy is not None and prompts is None:
        _fail("--policy needs --prompts FILE")
    if task_type is not None and task_type not in TASK_TYPES:
        _fail(f"--task-type {task_type!r}: choose one of {', '.join(TASK_TYPES)}")
    guidelines_text = ""
    if guidelines is not None:
        if guidelines.is_dir():
            _fail(f"--guidelines {guidelines}: a directory, not a file")
        if not guidelines.is_file():
            _fail(f"--guidelines {guidelines}: file not found")
        try:
            guidelines_text = guidelines.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            _fail(f"--guidelines {guidelines}: not UTF-8 text (byte {exc.start}: {exc.reason})")
    max_bytes = int(max_file_mb * 2**20) if max_file_mb > 0 else None
    store = _open_store(db)
    labels: list[dict] = []
    try:
        try:
            pid: int | None = store.project_id(project)
            kind = store.project(pid).task_type
        except KeyError:
            pid, kind = None, task_type or "comparison"  # created once its items are read and valid
        if raw is not None and pid is not None:
            _fail(
                f"--raw: project {project!r} exists already; a raw import recreates a project, name a new one"
            )
        if task_type is not None and task_type != kind:
            _fail(f"--task-type {task_type}: project {project!r} is a {kind} project, not {task_type}")
        if raw is not None:
            check_import_size(raw, max_bytes)
            kind, items, labels = read_raw_file(raw, task_type, overlap)
        elif file is not None:
            check_import_size(file, max_bytes)
            items = read_import_file(file, kind, overlap)
        else:
            assert prompts is not None
            texts = [record.prompt for record in read_records(prompts, "prompt")]
            if not all(isinstance(t, str) for t in texts):
                _fail(f"--prompts {prompts}: sampling takes plain-string prompts, not chat messages")
            items = []
            for row in sample_items(policy, texts, k, seed=seed):
                items.extend(line_to_items(row, kind))
            for index, item in enumerate(items):
                validate_item(index, item, overlap, kind)
        skipped = 0
        if pid is None:
            # One transaction: a lost connection cannot leave an empty project behind.
            pid, ids = store.import_project(
                project, kind, items, labels, guidelines=guidelines_text, overlap=overlap
            )
        else:
            items, skipped = items_not_in(items, store.items(pid), kind)
            ids = store.add_items(pid, items)
    except (DataError, ItemError, ValueError) as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:
        _fail(
            f"--db {store.url}: the import failed, and nothing of it was stored: {str(exc).splitlines()[0]}"
        )
    finally:
        store.close()
    already = f"; skipped {skipped} already in the project" if skipped else ""
    with_labels = f" with {len(labels)} labels" if raw is not None else ""
    console.print(f"imported {len(ids)} items{with_labels} into project {project!r} ({kind}){already}")


@feedback_app.command("aggregate")
def feedback_aggregate(
    db: Annotated[str, typer.Option(help="database URL or SQLite file")],
    project: Annotated[str, typer.Option(help="project name")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output JSONL file of TRL pairs")],
    method: Annotated[str, typer.Option(help="mv, wawa, ds, mace, bt or noisy_bt")] = "ds",
    seed: Annotated[int, typer.Option(help="seed of the randomised methods (MACE, noisy BT)")] = 0,
    margin: Annotated[
        str,
        typer.Option(
            help="the pairs' margin: confidence (2 * P(chosen wins) - 1) or strength (mean 1..3 strength "
            "of the labels that chose the winner, / 3; rankings and labels without one keep the confidence)"
        ),
    ] = "confidence",
) -> None:
    """Aggregate a project's labels into TRL pairs with a margin (2 * confidence - 1, or from strengths)."""
    from rlhfkit.crowd.aggregate import MARGIN_SOURCES, METHODS, aggregate_pairs
    from rlhfkit.data.io import write_jsonl

    if method not in METHODS:
        _fail(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if margin not in MARGIN_SOURCES:
        _fail(f"--margin {margin!r}: choose one of {', '.join(MARGIN_SOURCES)}")
    _out_file(out)
    store = _open_store(db, existing=True)
    try:
        pid = store.project_id(project)
        # Golden items and excluded annotators stay out of training data, as in every export.
        # Labels before items, as in FeedbackStore.export: each label read then finds its item.
        labels = store.labels(pid, include_golden=False, include_excluded=False)
        items = {item.item_id: item for item in store.items(pid)}
        aggregated = aggregate_pairs(items, labels, method, f"feedback:{project}", seed, margin)
    except KeyError as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
    except ValueError as exc:
        _fail(str(exc))
    finally:
        store.close()
    n = write_jsonl(out, aggregated.rows)
    console.print(
        f"{method}: {aggregated.n_items} items from {len(labels)} labels, "
        f"{aggregated.n_undecided} without a winner, "
        f"{aggregated.n_identical} skipped for two identical responses; "
        f"wrote {n} pairs to {out}"
    )
    if margin == "strength":
        n_strength = sum(row["margin_source"] == "strength" for row in aggregated.rows)
        console.print(f"margins: {n_strength} from strengths, {n - n_strength} from the confidence")


@feedback_app.command("quality")
def feedback_quality(
    db: Annotated[str, typer.Option(help="database URL or SQLite file")],
    project: Annotated[str, typer.Option(help="project name")],
    threshold: Annotated[float, typer.Option(help="flag annotators whose skill is below this")] = 0.6,
    method: Annotated[str, typer.Option(help="aggregate that skill is measured against")] = "ds",
    exclude_flagged: Annotated[
        bool, typer.Option("--exclude-flagged", help="exclude flagged annotators from exports")
    ] = False,
    seed: Annotated[int, typer.Option(help="seed of MACE's spam estimate")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the agreement and every annotator's row here")
    ] = None,
) -> None:
    """Agreement and per-annotator quality (skill, speed, position/length bias, spam); flag the weak ones."""
    import dataclasses

    from rich.table import Table

    from rlhfkit.crowd.aggregate import METHODS, aggregate
    from rlhfkit.crowd.quality import agreement_by_level, annotator_quality, mace_spam_probability

    if not 0.0 <= threshold <= 1.0:
        _fail(f"--threshold {threshold}: must be in [0, 1]")
    if method not in METHODS:
        _fail(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if json_out is not None:
        _out_file(json_out, "--json")
    store = _open_store(db, existing=True)
    try:
        pid = store.project_id(project)
        task_type = store.project(pid).task_type
        items = {item.item_id: item for item in store.items(pid)}
        labels = store.labels(pid)
        work = [lb for lb in labels if not lb.is_golden]
        alphas = agreement_by_level(work)
        by_type = agreement_by_level(
            lb
            for p in store.projects()
            if p.task_type == task_type
            for lb in store.labels(p.project_id, include_golden=False)
        )
        pairwise = [lb for lb in work if lb.kind in ("comparison", "ranking")]
        aggregates = aggregate(pairwise, method, seed=seed, items=items) if pairwise else {}
        spam = mace_spam_probability(work, seed=seed)
        # The items are already read (one query): their responses give the lengths for the length bias.
        report = annotator_quality(labels, aggregates, spam, threshold, items=items)
        flagged = [q.annotator for q in report if q.flagged]
        if exclude_flagged:
            for name in flagged:
                store.exclude_annotator(name)
    except KeyError as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
    except ValueError as exc:
        _fail(str(exc))
    finally:
        store.close()

    def shown(value: float | None, form: str = ".2f") -> str:
        return "-" if value is None else format(value, form)

    console.print(
        f"project {project!r} ({task_type}): {len(work)} labels, Krippendorff's alpha "
        + ", ".join(f"{level} {shown(a, '.3f')}" for level, a in alphas.items())
        + f"; all {task_type} projects: "
        + ", ".join(f"{level} {shown(a, '.3f')}" for level, a in by_type.items()),
        highlight=False,
    )
    table = Table(title=f"annotators (skill vs {method} aggregate or golden items; threshold {threshold})")
    for column in (
        "annotator",
        "labels",
        "skill",
        "golden",
        "agree",
        "s/label",
        "left",
        "length",
        "spam",
        "flags",
    ):
        table.add_column(column, justify="left" if column in ("annotator", "flags") else "right")
    for q in report:
        table.add_row(
            q.annotator,
            str(q.n_labels),
            shown(q.skill),
            "-" if q.golden_accuracy is None else f"{q.golden_accuracy:.2f} ({q.n_golden})",
            "-" if q.aggregate_agreement is None else f"{q.aggregate_agreement:.2f} ({q.n_overlapped})",
            shown(q.seconds_per_label, ".1f"),
            shown(q.left_share),
            "-" if q.length is None else f"{q.length.bias:+.2f} ({q.length.n_labels})",
            shown(q.spam_probability),
            "[red]" + escape("; ".join(q.flags)) + "[/red]" if q.flags else "",
        )
    console.print(table)
    if json_out is not None:
        summary = {
            "project": project,
            "task_type": task_type,
            "method": method,
            "threshold": threshold,
            "n_labels": len(work),
            "alpha": alphas,
            "alpha_task_type": by_type,
            "annotators": [{**dataclasses.asdict(q), "flagged": q.flagged} for q in report],
        }
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {json_out}", highlight=False)
    if flagged:
        action = "excluded from exports" if exclude_flagged else "use --exclude-flagged to leave them out"
        console.print(f"flagged: {', '.join(flagged)} ({action})", highlight=False)
    else:
        console.print("no annotator flagged")


@config_app.command("show")
def config_show(
    section: Annotated[str | None, typer.Argument(help="one section, e.g. ppo")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = "default",
) -> None:
    """Print the resolved config as YAML, each key with its meaning as a comment."""
    cfg = _load(config, set_, preset)
    if section is None:
        sys.stdout.write(dump_commented(cfg))
        return
    value = getattr(cfg, section, None) if section in RunConfig.model_fields else None
    if value is None:
        _fail(f"unknown config section {section!r} (choose: {', '.join(RunConfig.model_fields)})")
    if not isinstance(value, BaseModel):  # a top-level scalar such as `seed`
        sys.stdout.write(f"{section}: {value}\n")
        return
    doc = (type(value).__doc__ or "").strip()
    header = "".join(f"# {line.strip()}\n" for line in doc.splitlines() if line.strip())
    sys.stdout.write(header + f"{section}:\n" + dump_commented(value, 1))


def _not_accelerator_detection(record: logging.LogRecord) -> bool:
    return record.filename != "real_accelerator.py" or record.levelno >= logging.ERROR


@app.callback()
def _quiet_libraries() -> None:
    """Our progress bars and summaries replace the libraries' per-file loading chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # Two notices printed by every training command on a CPU machine, neither about the user's run:
    # DeepSpeed (imported by accelerate when installed) says, on stdout, that it found no GPU; and
    # bitsandbytes (imported by peft when installed) says that it could not download an optional
    # 4-bit CPU kernel from the hub. Both loggers are named before the libraries create them; a
    # filter, unlike a level, outlives DeepSpeed setting its logger's level on import.
    if _not_accelerator_detection not in logging.getLogger("DeepSpeed").filters:
        logging.getLogger("DeepSpeed").addFilter(_not_accelerator_detection)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main() -> None:
    """Entry point for `python -m rlhfkit`."""
    app()
