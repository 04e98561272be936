"""Where a PPO step spends its time: generation, reward scoring, reference forward, critic, update.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ppo_profile.py --steps 4

Runs `rlhfkit.train.ppo.run_ppo` on the bench's tiny model (built by bench/vs_trl.py's
`prepare`) with timers wrapped around the functions each phase calls; nothing in the
training code changes. Phases are summed over all steps; "other" is the rest of the run
(loading, optimiser steps, advantages, logging, saving).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import BENCH_DIR, SETTINGS, prepare, read_jsonl  # noqa: E402

import rlhfkit.rollout.sampler as sampler  # noqa: E402
import rlhfkit.train.ppo as ppo  # noqa: E402
from rlhfkit.config import RunConfig  # noqa: E402

PHASES = (
    "generation",
    "policy old log-probs",
    "reference forward",
    "critic values",
    "reward scoring",
    "update",
)


# Wall seconds, or CPU seconds of this process (`--clock cpu`): on a machine shared with other
# jobs, CPU time measures the work and is far less disturbed by them.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(totals: dict[str, float], phase_of, fn):
    """`fn` with its time on `clock` added to totals[phase_of(args)] (None: not counted)."""

    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            phase = phase_of(*args)
            if phase is not None:
                totals[phase] += clock() - start

    return wrapper


def forward_phase(module, *args) -> str | None:
    """Which phase a PolicyValue forward belongs to: frozen weights are the reference."""
    if not torch.is_grad_enabled():
        trainable = any(p.requires_grad for p in module.policy.parameters())
        return "policy old log-probs" if trainable else "reference forward"
    return None  # with grad: inside _micro_step, counted as update


def profile(work: Path, steps: int) -> dict[str, float]:
    """Seconds per phase over one run of `steps` PPO iterations."""
    totals: dict[str, float] = defaultdict(float)
    # Generation: the HF backend's sampler, which run_ppo reaches through make_sampler.
    original_sample = sampler.sample_responses
    sampler.sample_responses = timed(totals, lambda *a: "generation", original_sample)
    patches = {
        "sequence_scores": lambda *a: "reward scoring",
        "critic_values": lambda *a: "critic values" if not torch.is_grad_enabled() else None,
        "_micro_step": lambda *a: "update",
    }
    originals = {name: getattr(ppo, name) for name in patches}
    original_forward = ppo.PolicyValue.forward
    for name, phase_of in patches.items():
        setattr(ppo, name, timed(totals, phase_of, originals[name]))
    ppo.PolicyValue.forward = timed(totals, forward_phase, original_forward)
    s = SETTINGS["ppo"]
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
    prompts = [r["prompt"] for r in read_jsonl(work / "prompts.jsonl")]
    try:
        start = clock()
        ppo.run_ppo(
            RunConfig(ppo=sec),
            work / "model",
            work / "rm-init",
            prompts,
            work / "runs" / "profile-ppo",
            False,
        )
        total = clock() - start
    finally:
        for name, fn in originals.items():
            setattr(ppo, name, fn)
        sampler.sample_responses = original_sample
        ppo.PolicyValue.forward = original_forward
    out = {phase: totals.get(phase, 0.0) for phase in PHASES}
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs; the median of each phase is shown")
    parser.add_argument("--work", type=Path, default=BENCH_DIR / ".work")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall or CPU seconds")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    global clock
    clock = CLOCKS[args.clock]
    prepare(args.work)
    runs = [profile(args.work, args.steps) for _ in range(args.repeats)]
    med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    print(f"PPO step profile, {args.steps} steps, median of {args.repeats} runs, {args.clock} clock\n")
    print(f"| phase | {args.clock} seconds | share |\n|---|---|---|")
    for phase in (*PHASES, "other"):
        print(f"| {phase} | {med[phase]:.2f} | {100 * med[phase] / med['total']:.0f}% |")
    print(f"| total | {med['total']:.2f} | 100% |")
    if args.json:
        args.json.write_text(json.dumps({"median": med, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
