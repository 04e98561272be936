"""Checkpoints that resume a run exactly, and a clean stop on SIGINT/SIGTERM.

A checkpoint is a folder `checkpoints/step-N/`: the policy as a Hugging Face model
folder (so any checkpoint loads with `from_pretrained`, e.g. for over-optimisation
sweeps) plus `trainer_state.pt` with everything else a bit-identical continuation needs:
the other models' weights, optimiser and schedule states, RNG states, controllers.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rlhfkit.models.loading import save_model

STATE_FILE = "trainer_state.pt"


class TrainingInterrupted(RuntimeError):
    """A run stopped on SIGINT/SIGTERM after saving a checkpoint it can resume from."""

    def __init__(self, stage: str, step: int, checkpoint: Path):
        super().__init__(f"{stage} interrupted at step {step}; checkpoint saved in {checkpoint}")
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


def checkpoint_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        suffix = path.name.removeprefix("step-")
        if suffix.isdigit() and (path / "config.json").is_file():
            found.append((int(suffix), path))
    return sorted(found)


def latest_resumable(root: Path) -> Path | None:
    """The newest checkpoint that holds a trainer state, or None."""
    resumable = [path for _, path in checkpoint_steps(root) if (path / STATE_FILE).is_file()]
    return resumable[-1] if resumable else None


def save_checkpoint(
    root: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    state: dict[str, Any],
    keep_states: int = 1,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `root/step-N` atomically (a temporary folder renamed when complete).

    `weights` replaces the model's own (its weights gathered whole when they are sharded, see
    `rlhfkit.train.distributed.pretrained_weights`). Only the `keep_states` newest checkpoints
    keep their trainer state; older ones keep the policy weights, which is all an evaluation
    sweep needs.
    """
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp, state_dict=weights)
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with_state = [path for _, path in checkpoint_steps(root) if (path / STATE_FILE).is_file()]
    for path in with_state[:-keep_states]:
        (path / STATE_FILE).unlink()
    return final


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state saved with a checkpoint (our own file: full unpickling is safe)."""
    return torch.load(checkpoint / STATE_FILE, weights_only=False)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, saves, and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Turn SIGINT/SIGTERM into a flag for the duration (a second signal stops at once)."""
    flag = StopFlag()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if flag:
            # A second signal: the user really wants out, checkpoint or not.
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        flag.signal = signum

    try:
        for sig in previous:
            signal.signal(sig, handler)
    except ValueError:
        # Not the main thread (e.g. a server running a stage): signals stay as they are.
        yield flag
        return
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
