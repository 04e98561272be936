"""rlhfkit against Hugging Face TRL on the same work: steps/s, peak RSS and final loss.

    OMP_NUM_THREADS=1 .venv/bin/python bench/vs_trl.py --algo sft --steps 30 --repeats 3
    OMP_NUM_THREADS=1 .venv/bin/python bench/vs_trl.py --algo all

One tiny model (`tiny_causal_lm`) and one data set (from the top-5 task) are built once
and saved under `--work`. Each training run is a fresh subprocess (so its peak RSS is its
own), the two libraries alternate within every repeat, and the table shows medians.

Equal work: both sides get the same saved checkpoint, the same token ids, batch size,
number of optimiser steps, learning rate and schedule (no warm-up), gradient clip 1.0,
seed and fp32 precision. For sft, rm and dpo the data set holds exactly one batch, so
every step sees the same examples on both sides whatever order a sampler picks, and
the loss after N steps must agree (the column `loss diff`). grpo and rloo sample, and
two libraries never draw the same samples, so for them the table shows the mean reward
of the run (same reward function, same number of sampled tokens) next to the loss.

PPO runs against the last TRL release that ships PPOTrainer (0.29.1), installed in
its own virtual environment (`bench/.venv-trl-ppo`, created on first use).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PPO_VENV = BENCH_DIR / ".venv-trl-ppo"
PPO_TRL_VERSION = "0.29.1"  # the last release with PPOTrainer (trl.experimental.ppo); 1.0 removed it
ALGOS = ("sft", "rm", "dpo", "grpo", "rloo", "ppo")

# One setting per algorithm, used verbatim by both sides.
SETTINGS = {
    "sft": {"batch_size": 8, "lr": 5e-4, "max_length": 128},
    "rm": {"batch_size": 8, "lr": 3e-4, "max_length": 128},
    "dpo": {"batch_size": 8, "lr": 5e-4, "max_length": 128, "beta": 0.1},
    "grpo": {"prompts": 4, "group": 4, "lr": 1e-4, "max_new_tokens": 24, "beta": 0.04},
    "rloo": {"prompts": 4, "group": 4, "lr": 1e-4, "max_new_tokens": 24, "beta": 0.05},
    "ppo": {"batch_size": 16, "minibatch": 8, "ppo_epochs": 1, "lr": 1e-4, "max_new_tokens": 24, "kl": 0.05},
}
DEFAULT_STEPS = {"sft": 30, "rm": 30, "dpo": 30, "grpo": 8, "rloo": 8, "ppo": 4}


def vowel_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """Share of characters that are vowels: cheap, deterministic, and it varies between samples
    of a random model (so group advantages are not all zero)."""
    return [sum(ch in "aeiou" for ch in c.lower()) / max(len(c), 1) for c in completions]


# --------------------------------------------------------------------------- data and model


def prepare(work: Path) -> None:
    """Tokenizer, tiny model, reward-model start and the data files, built once under `work`."""
    if (work / "ready").is_file():
        return
    import torch

    from rlhfkit.data.io import write_jsonl
    from rlhfkit.models.loading import load_reward_model, save_model, tiny_causal_lm
    from rlhfkit.models.tokenizer import completion_token_ids, prompt_token_ids, train_tokenizer
    from rlhfkit.tasks.top5 import build

    work.mkdir(parents=True, exist_ok=True)
    task = build(0)
    tokenizer = train_tokenizer(task.corpus[:4000] + [d["completion"] for d in task.demonstrations], 4096)
    save_model(tiny_causal_lm(tokenizer, seed=0), tokenizer, work / "model")
    # The reward model's fresh head is created once and saved, so both sides start from it.
    torch.manual_seed(0)
    save_model(load_reward_model(work / "model", tokenizer.pad_token_id), tokenizer, work / "rm-init")
    demos = task.demonstrations[:8]
    # A rejected answer breaks the list: items reversed and the last one repeated.
    pairs = []
    for d in demos:
        lines = d["completion"].splitlines()[::-1]
        pairs.append(
            {"prompt": d["prompt"], "chosen": d["completion"], "rejected": "\n".join(lines + lines[-1:])}
        )
    write_jsonl(work / "demos.jsonl", demos)
    write_jsonl(work / "pairs.jsonl", pairs)
    write_jsonl(work / "prompts.jsonl", [{"prompt": p} for p in task.train_prompts[:64]])
    # TRL takes the chat-rendered prompt text; check it tokenises to exactly our ids.
    for d in demos:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": d["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        joined = tokenizer(text + d["completion"] + tokenizer.eos_token, add_special_tokens=False)[
            "input_ids"
        ]
        if joined != prompt_token_ids(tokenizer, d["prompt"]) + completion_token_ids(
            tokenizer, d["completion"]
        ):
            raise SystemExit(f"tokenisation differs between the two sides for {d['prompt']!r}")
    (work / "ready").write_text("ok\n")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file the bench wrote itself."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chat_text(tokenizer, prompt: str) -> str:
    """The prompt as TRL receives it: our chat template, rendered to text."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


# --------------------------------------------------------------------------- rlhfkit side


def run_rlhfkit(algo: str, work: Path, steps: int, out: Path) -> dict:
    """Train with rlhfkit's stage functions (the code path the CLI runs); returns the last metrics."""
    from rlhfkit.config import RunConfig
    from rlhfkit.train.rewards import RewardTerm

    s = SETTINGS[algo]
    demos, pairs = read_jsonl(work / "demos.jsonl"), read_jsonl(work / "pairs.jsonl")
    prompts = [r["prompt"] for r in read_jsonl(work / "prompts.jsonl")]
    if algo == "sft":
        from rlhfkit.train.sft import run_sft

        sec = {
            "epochs": steps,
            "batch_size": s["batch_size"],
            "lr": s["lr"],
            "warmup_ratio": 0.0,
            "max_length": s["max_length"],
        }
        run_sft(RunConfig(sft=sec), work / "model", demos, out, show_progress=False)
    elif algo == "rm":
        from rlhfkit.train.rm import run_rm

        sec = {
            "epochs": steps,
            "batch_size": s["batch_size"],
            "lr": s["lr"],
            "warmup_ratio": 0.0,
            "val_share": 0.0,
        }
        run_rm(RunConfig(rm=sec), work / "rm-init", pairs, out, show_progress=False)
    elif algo == "dpo":
        from rlhfkit.train.dpo import run_dpo

        sec = {
            "epochs": steps,
            "batch_size": s["batch_size"],
            "lr": s["lr"],
            "warmup_ratio": 0.0,
            "beta": s["beta"],
            "label_smoothing": 0.0,  # TRL's default; rlhfkit's task default is conservative DPO
        }
        run_dpo(RunConfig(dpo=sec), work / "model", pairs, out, show_progress=False)
    elif algo in ("grpo", "rloo"):
        from rlhfkit.train.grpo import run_critic_free

        sec = {
            "steps": steps,
            "prompts_per_step": s["prompts"],
            "group_size": s["group"],
            "minibatch": s["prompts"] * s["group"],
            "lr": s["lr"],
            "max_new_tokens": s["max_new_tokens"],
            "kl_coef": s["beta"],
            "update_epochs": 1,  # TRL's num_iterations default
        }
        terms = [RewardTerm("vowels", 1.0, vowel_reward)]
        run_critic_free(
            RunConfig(**{algo: sec}), algo, work / "model", terms, prompts, out, show_progress=False
        )
    elif algo == "ppo":
        from rlhfkit.train.ppo import run_ppo

        sec = {
            "steps": steps,
            "rollout_batch": s["batch_size"],
            "minibatch": s["minibatch"],
            "ppo_epochs": s["ppo_epochs"],
            "lr": s["lr"],
            "critic_lr": s["lr"],
            "max_new_tokens": s["max_new_tokens"],
            "kl_coef": s["kl"],
            "reward_norm": False,
            "save_every": 0,
        }
        run_ppo(RunConfig(ppo=sec), work / "model", work / "rm-init", prompts, out, show_progress=False)
    rows = read_jsonl(out / "metrics.jsonl")
    reward_key = "reward/total" if algo in ("grpo", "rloo") else "reward/score"
    rewards = [r[reward_key] for r in rows if r.get(reward_key) is not None]
    loss_key = "loss" if algo != "ppo" else "loss/policy"
    return {
        "loss": rows[-1].get(loss_key),
        "mean_reward": statistics.fmean(rewards) if rewards else None,
        "logged_steps": rows[-1]["step"],
    }


# --------------------------------------------------------------------------- TRL side


def trl_common(algo: str, steps: int, out: Path) -> dict:
    """TrainingArguments both libraries' defaults differ on, set to rlhfkit's values."""
    return {
        "output_dir": str(out),
        "max_steps": steps,
        "learning_rate": SETTINGS[algo]["lr"],
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "seed": 0,
        "bf16": False,  # TRL defaults to bf16 mixed precision; rlhfkit trains in fp32
        # TRL 1.x turns gradient checkpointing on by default; rlhfkit's default is off. The
        # recompute is extra work, so both sides run without it (equal work, not equal defaults).
        "gradient_checkpointing": False,
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def run_trl(algo: str, work: Path, steps: int, out: Path) -> dict:
    """Train the same steps with TRL's trainer for `algo`; returns the last logged metrics."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    s = SETTINGS[algo]
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    demos, pairs = read_jsonl(work / "demos.jsonl"), read_jsonl(work / "pairs.jsonl")
    prompts = [r["prompt"] for r in read_jsonl(work / "prompts.jsonl")]
    common = trl_common(algo, steps, out)
    if algo == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = []
        for d in demos:  # pre-tokenised exactly as rlhfkit does: prompt ids, completion ids + EOS
            p = tokenizer(chat_text(tokenizer, d["prompt"]), add_special_tokens=False)["input_ids"]
            c = tokenizer(d["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
        args = SFTConfig(
            **common,
            per_device_train_batch_size=s["batch_size"],
            lr_scheduler_type="cosine",
            max_length=s["max_length"],
            completion_only_loss=True,  # TRL's default for pre-tokenised data is the loss on every token
        )
        trainer = SFTTrainer(
            model=str(work / "model"),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    elif algo == "rm":
        from trl import RewardConfig, RewardTrainer

        rows = []
        for d in pairs:
            p = tokenizer(chat_text(tokenizer, d["prompt"]), add_special_tokens=False)["input_ids"]
            ids = {
                k: p + tokenizer(d[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for k in ("chosen", "rejected")
            }
            rows.append({"chosen_ids": ids["chosen"], "rejected_ids": ids["rejected"]})
        args = RewardConfig(
            **common,
            per_device_train_batch_size=s["batch_size"],
            lr_scheduler_type="cosine",
            max_length=s["max_length"],
        )
        trainer = RewardTrainer(
            model=str(work / "rm-init"),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    elif algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        rows = [
            {"prompt": chat_text(tokenizer, d["prompt"]), "chosen": d["chosen"], "rejected": d["rejected"]}
            for d in pairs
        ]
        args = DPOConfig(
            **common,
            per_device_train_batch_size=s["batch_size"],
            lr_scheduler_type="cosine",
            max_length=s["max_length"],
            beta=s["beta"],
            loss_type=["sigmoid"],
            precompute_ref_log_probs=True,  # as rlhfkit's dpo.precompute_reference default
        )
        trainer = DPOTrainer(
            model=str(work / "model"),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    elif algo in ("grpo", "rloo"):
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
        extra = {"loss_type": "grpo", "scale_rewards": "group"} if algo == "grpo" else {}
        args = config_cls(
            **common,
            per_device_train_batch_size=s["prompts"] * s["group"],
            num_generations=s["group"],
            max_completion_length=s["max_new_tokens"],
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=s["beta"],
            num_iterations=1,
            lr_scheduler_type="linear",
            **extra,
        )
        data = Dataset.from_list([{"prompt": chat_text(tokenizer, p)} for p in prompts])
        trainer = trainer_cls(
            model=str(work / "model"),
            reward_funcs=vowel_reward,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
        )
    else:
        raise SystemExit(f"run_trl: unknown algo {algo!r}")
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {
        "loss": logs[-1]["loss"] if logs else None,
        "mean_reward": statistics.fmean(rewards) if rewards else None,
        "logged_steps": trainer.state.global_step,
        "train_only_seconds": train_seconds,
    }


def run_trl_ppo(work: Path, steps: int, out: Path) -> dict:
    """PPO with TRL 0.29.1's PPOTrainer (runs inside bench/.venv-trl-ppo)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = SETTINGS["ppo"]
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    prompts = [r["prompt"] for r in read_jsonl(work / "prompts.jsonl")]
    ids = [tokenizer(chat_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    data = Dataset.from_list([{"input_ids": i} for i in ids])
    common = trl_common("ppo", steps, out)
    common.pop("max_steps")
    args = PPOConfig(
        **common,
        total_episodes=steps * s["batch_size"],
        per_device_train_batch_size=s["minibatch"],
        gradient_accumulation_steps=1,
        num_mini_batches=s["batch_size"] // s["minibatch"],
        num_ppo_epochs=s["ppo_epochs"],
        response_length=s["max_new_tokens"],
        temperature=1.0,
        kl_coef=s["kl"],
        stop_token="eos",
        missing_eos_penalty=None,
        lr_scheduler_type="linear",
        num_sample_generations=0,
    )
    # PPOTrainer's batch is per_device_train_batch_size * num_mini_batches = rollout_batch.
    args.per_device_train_batch_size = s["batch_size"]
    f32 = {"dtype": torch.float32}
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(str(work / "model"), **f32),
        ref_model=AutoModelForCausalLM.from_pretrained(str(work / "model"), **f32),
        reward_model=AutoModelForSequenceClassification.from_pretrained(
            str(work / "rm-init"), num_labels=1, **f32
        ),
        value_model=AutoModelForSequenceClassification.from_pretrained(
            str(work / "rm-init"), num_labels=1, **f32
        ),
        train_dataset=data,
    )
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    logs = [h for h in trainer.state.log_history if "loss/policy_avg" in h]
    return {
        "loss": logs[-1]["loss/policy_avg"] if logs else None,
        "mean_reward": statistics.fmean(h["objective/scores"] for h in logs) if logs else None,
        "logged_steps": trainer.state.global_step,
        "train_only_seconds": train_seconds,
    }


# --------------------------------------------------------------------------- driver


def preload(side: str, algo: str) -> None:
    """Import the side's training code before the clock starts: import time is not training time."""
    # Both sides' runs import DeepSpeed when it is installed (accelerate's `unwrap_model` checks for
    # its engine class; about 0.2 s): import time too, so it is imported here on both sides.
    with contextlib.suppress(ImportError):
        import deepspeed  # noqa: F401
    if side == "rlhfkit":
        import rlhfkit.train.dpo
        import rlhfkit.train.grpo
        import rlhfkit.train.ppo
        import rlhfkit.train.rm
        import rlhfkit.train.sft  # noqa: F401

        # MetricsLog imports TensorBoard's writer when installed (about 0.3 s): import time too.
        with contextlib.suppress(ImportError):
            import torch.utils.tensorboard  # noqa: F401
    elif algo == "ppo":
        import trl.experimental.ppo  # noqa: F401
    else:
        import datasets
        import trl  # noqa: F401

        # trl's top-level names are lazy: touch the trainer so its module tree loads now.
        getattr(
            trl,
            {"sft": "SFTTrainer", "rm": "RewardTrainer", "dpo": "DPOTrainer"}.get(
                algo, algo.upper() + "Trainer"
            ),
        )
        datasets.Dataset.from_list([{"x": 1}])


def worker(side: str, algo: str, work: Path, steps: int, result: Path) -> None:
    """One training run in this (fresh) process; writes wall time, steps/s, peak RSS and metrics."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = work / "runs" / f"{side}-{algo}"
    preload(side, algo)
    start = time.perf_counter()  # after imports: model loading, data preparation and training count
    cpu_start = time.process_time()
    if side == "rlhfkit":
        metrics = run_rlhfkit(algo, work, steps, out)
    elif algo == "ppo":
        metrics = run_trl_ppo(work, steps, out)
    else:
        metrics = run_trl(algo, work, steps, out)
    seconds = time.perf_counter() - start
    # CPU seconds of this process (all its threads): the work done, less disturbed than wall time
    # by other jobs on a shared machine.
    cpu_seconds = time.process_time() - cpu_start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    result.write_text(
        json.dumps(
            {
                "seconds": seconds,
                "steps_per_s": steps / seconds,
                "cpu_seconds": cpu_seconds,
                "peak_rss_mib": peak_mib,
                **metrics,
            }
        )
    )


def ensure_ppo_venv() -> Path:
    """bench/.venv-trl-ppo with TRL 0.29.1; torch, transformers and the rest come from .venv."""
    python = PPO_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PPO_VENV)], check=True)
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # Reuse the project's torch 2.13.0 / transformers: TRL 0.29.1 runs with transformers 5.x.
        base = subprocess.run(
            [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        Path(purelib, "_rlhfkit_base.pth").write_text(base + "\n")
    check = subprocess.run(
        [str(python), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True
    )
    if check.stdout.strip() != PPO_TRL_VERSION:
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--no-deps", f"trl=={PPO_TRL_VERSION}"], check=True
        )
    return python


def run_once(side: str, algo: str, work: Path, steps: int) -> dict:
    """One subprocess run; its JSON result (or the error it died with)."""
    python = ensure_ppo_venv() if (side == "trl" and algo == "ppo") else Path(sys.executable)
    result = work / f"result-{side}-{algo}.json"
    result.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [
        str(python),
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--algo",
        algo,
        "--work",
        str(work),
        "--steps",
        str(steps),
        "--result",
        str(result),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise SystemExit(f"{side} {algo} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(result.read_text())


def fmt(value, spec: str) -> str:
    """A number in `spec`, or '-' when absent."""
    return "-" if value is None else format(value, spec)


def bench(algo: str, work: Path, steps: int, repeats: int) -> dict:
    """Alternate rlhfkit and TRL `repeats` times (order flipped each repeat); medians per side."""
    runs: dict[str, list[dict]] = {"rlhfkit": [], "trl": []}
    for r in range(repeats):
        order = ("rlhfkit", "trl") if r % 2 == 0 else ("trl", "rlhfkit")
        for side in order:
            res = run_once(side, algo, work, steps)
            runs[side].append(res)
            print(
                f"  {algo} repeat {r + 1} {side:7s}: {res['steps_per_s']:.3f} steps/s, "
                f"{res['cpu_seconds']:.2f} CPU s, "
                f"{res['peak_rss_mib']:.0f} MiB, loss {fmt(res['loss'], '.4f')}",
                flush=True,
            )
    med = {
        side: {k: statistics.median(x[k] for x in rs) for k in ("steps_per_s", "cpu_seconds", "peak_rss_mib")}
        | {
            "loss": rs[-1]["loss"],
            "mean_reward": statistics.median([x["mean_reward"] for x in rs])
            if rs[-1]["mean_reward"] is not None
            else None,
        }
        for side, rs in runs.items()
    }
    a, b = med["rlhfkit"], med["trl"]
    loss_diff = None
    if a["loss"] is not None and b["loss"] is not None and algo in ("sft", "rm", "dpo"):
        loss_diff = abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12)
    return {
        "algo": algo,
        "steps": steps,
        "repeats": repeats,
        "rlhfkit": a,
        "trl": b,
        "speed_ratio": a["steps_per_s"] / b["steps_per_s"],
        "cpu_ratio": b["cpu_seconds"] / a["cpu_seconds"],
        "rss_ratio": a["peak_rss_mib"] / b["peak_rss_mib"],
        "loss_rel_diff": loss_diff,
        "runs": runs,
    }


def print_table(rows: list[dict]) -> None:
    """The Markdown table that goes into bench/README.md."""
    print(
        "\n| algo | steps | rlhfkit steps/s | TRL steps/s | speed ratio "
        "| rlhfkit CPU s | TRL CPU s | CPU ratio "
        "| rlhfkit RSS MiB | TRL RSS MiB | RSS ratio "
        "| rlhfkit loss | TRL loss | loss diff | rlhfkit mean reward | TRL mean reward |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["rlhfkit"], r["trl"]
        diff = "-" if r["loss_rel_diff"] is None else f"{100 * r['loss_rel_diff']:.2f}%"
        print(
            f"| {r['algo']} | {r['steps']} | {a['steps_per_s']:.3f} | {b['steps_per_s']:.3f} "
            f"| **{r['speed_ratio']:.2f}x** "
            f"| {a['cpu_seconds']:.2f} | {b['cpu_seconds']:.2f} | {r['cpu_ratio']:.2f}x "
            f"| {a['peak_rss_mib']:.0f} | {b['peak_rss_mib']:.0f} | {r['rss_ratio']:.2f} "
            f"| {fmt(a['loss'], '.4f')} "
            f"| {fmt(b['loss'], '.4f')} | {diff} "
            f"| {fmt(a['mean_reward'], '.4f')} | {fmt(b['mean_reward'], '.4f')} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", required=True, choices=[*ALGOS, "all"])
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default per algo)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating repeats per side; medians reported"
    )
    parser.add_argument("--work", type=Path, default=BENCH_DIR / ".work", help="model, data and run folders")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.worker:
        worker(args.worker, args.algo, args.work, args.steps, args.result)
        return
    prepare(args.work)
    algos = ALGOS if args.algo == "all" else (args.algo,)
    rows = []
    for algo in algos:
        steps = args.steps or DEFAULT_STEPS[algo]
        print(
            f"{algo}: {steps} steps x {args.repeats} alternating repeats "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')})",
            flush=True,
        )
        rows.append(bench(algo, args.work, steps, args.repeats))
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
