"""The `rlhfkit` command: one subcommand per stage, plus the demo and feedback tools."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from rlhfkit.config import PRESETS, ConfigError, RunConfig, dump_config, load_config
from rlhfkit.data.io import DataError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Reinforcement learning from human feedback, end to end."
)
feedback_app = typer.Typer(no_args_is_help=True, help="The feedback store: collect, export.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
app.add_typer(feedback_app, name="feedback")
app.add_typer(config_app, name="config")
console = Console()
# soft_wrap: an error naming a long path must stay on one line, greppable.
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: KEY=VALUE, e.g. ppo.kl_coef=0.1")]
PresetOpt = Annotated[str, typer.Option(help=f"base settings: {', '.join(PRESETS)}")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="hide progress bars")]


def _fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit with status 2."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    raise typer.Exit(code=2)


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
) -> None:
    from rlhfkit.eval.report import summary_table
    from rlhfkit.pipeline import Run, StageError, run_demo, run_stage

    cfg = _load(config, sets, preset)
    try:
        run = Run(out, cfg, show_progress=not no_progress)
        if len(stage_names) > 1:
            report = run_demo(run, stage_names)
        else:
            run_stage(run, stage_names[0], reuse=reuse)
            report = run.read_report()
    except (DataError, StageError, ValueError) as exc:
        _fail(str(exc))
    if report.get("eval", {}).get("policies"):
        console.print(summary_table(report))
        console.print(f"run directory: {out}  (report.json, report.html)")


def _stage_command(stage: str, doc: str) -> None:
    def command(
        config: ConfigOpt = None,
        set_: SetOpt = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/demo"),
        preset: PresetOpt = "default",
        no_progress: NoProgressOpt = False,
    ) -> None:
        _run_stages((stage,), out, config, set_, preset, no_progress, reuse=False)

    command.__doc__ = doc
    app.command(stage)(command)


_stage_command("pretrain", "Train a tokenizer and pretrain a tiny causal LM from scratch.")
_stage_command("sft", "Supervised fine-tuning on demonstrations.")
_stage_command("rm", "Train the reward model on preference pairs.")
_stage_command("ppo", "Optimise the SFT policy against the reward model with PPO.")
_stage_command("eval", "Judge the policies of a run; write report.json and report.html.")


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


@feedback_app.command("simulate")
def feedback_simulate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory")] = Path("runs/demo"),
    preset: PresetOpt = "default",
) -> None:
    """Sample SFT completions into the store; simulated annotators label them; export pairs."""
    _run_stages(("feedback",), out, config, set_, preset, True, reuse=False)


@feedback_app.command("export")
def feedback_export(
    db: Annotated[str, typer.Option(help="database URL or SQLite file")],
    project: Annotated[str, typer.Option(help="project name")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output JSONL file")],
    format_: Annotated[str, typer.Option("--format", help="trl-preference or raw")] = "trl-preference",
) -> None:
    """Export a project's labels: aggregated TRL preference pairs, or every raw label."""
    from rlhfkit.feedback.store import FeedbackStore

    if format_ not in ("trl-preference", "raw"):
        _fail(f"--format {format_!r}: choose trl-preference or raw")
    store = FeedbackStore(db)
    try:
        pid = store.project_id(project)
        n = store.export_preferences(pid, out) if format_ == "trl-preference" else store.export_raw(pid, out)
    except KeyError as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
    finally:
        store.close()
    console.print(f"wrote {n} rows to {out}")


@config_app.command("show")
def config_show(
    section: Annotated[str | None, typer.Argument(help="one section, e.g. ppo")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = "default",
) -> None:
    """Print the resolved config as YAML (all of it, or one section)."""
    import yaml

    cfg = _load(config, set_, preset)
    if section is None:
        sys.stdout.write(dump_config(cfg))
        return
    data = cfg.model_dump(mode="json")
    if section not in data:
        _fail(f"unknown config section {section!r} (choose: {', '.join(data)})")
    sys.stdout.write(yaml.safe_dump({section: data[section]}, sort_keys=False))


@app.callback()
def _quiet_libraries() -> None:
    """Our progress bars and summaries replace the libraries' per-file loading chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main() -> None:
    """Entry point for `python -m rlhfkit`."""
    app()
