"""What every training loop shares: accelerator, optimiser + schedule, metrics, progress."""

from __future__ import annotations

import atexit
import functools
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import get_scheduler

MIXED_PRECISION = {"float32": None, "bfloat16": "bf16", "float16": "fp16"}


def make_accelerator(seed: int, dtype: str = "float32") -> Accelerator:
    """An Accelerator (CPU here; GPUs and several processes under `accelerate launch`), seeded.

    `dtype` (model.dtype) other than float32 turns on accelerate's mixed precision; float32
    leaves the choice to `accelerate launch --mixed_precision` / its config file.
    """
    set_seed(seed)
    # The run directory is our logger; no trackers unless a user asks for one.
    accelerator = Accelerator(log_with=None, mixed_precision=MIXED_PRECISION[dtype])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _leave_process_group_at_exit()
    return accelerator


@functools.cache
def _leave_process_group_at_exit() -> None:
    """Destroy the process group when this process exits, while Python is still whole.

    Left to interpreter shutdown, Gloo's worker threads can still hold tensors whose release needs
    the GIL of an interpreter being torn down, and the process aborts ("terminate called without an
    active exception", SIGABRT) after its work is done: seen once in a 2-process test run.
    """
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _mark_updated(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Bump the version counter of every parameter the step just updated (had a gradient)."""
    torch.autograd.graph.increment_version(
        [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    )


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    eps: float = 1e-8,
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with linear warm-up then `schedule` decay over `total_steps`, over the trainable `params`."""
    # Frozen parameters (a LoRA or QLoRA base, frozen layers) never get a gradient; leaving them out
    # changes no update and keeps a quantized base's packed tensors from switching fused AdamW off.
    params = [p for p in params if p.requires_grad]
    # Fused AdamW: one kernel over all tensors instead of about ten small ops per tensor, which
    # on a CPU cost more than the update itself for a small model (16 ms -> 2 ms per step for
    # the 1.4M-parameter bench model). Same update rule; plain tensors on CPU/CUDA only. Meta too:
    # under FSDP's cpu_ram_efficient_loading only the main process loads weights (the others get
    # their shards at prepare), and every process must choose the same kernel, else their shards are
    # updated with different roundings (and a resume, which restores the main process's choice,
    # would not continue the others exactly).
    fused = all(
        type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda", "meta")
        for p in params
    )
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps, fused=fused or None)
    if fused:
        # The fused kernel writes the weights without bumping their version counters, which
        # autograd's in-place checks and the vLLM weight sync (rollout/vllm.py) read.
        optimizer.register_step_post_hook(_mark_updated)
    # transformers' "constant" ignores num_warmup_steps; its warm-up variant is the same after it.
    name = "constant_with_warmup" if schedule == "constant" else schedule
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1)
    )
    return optimizer, scheduler


def apply_gradients(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    max_grad_norm: float = 1.0,
) -> None:
    """Clip the gradient norm, step the optimiser (and schedule), clear the gradients."""
    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class ShuffledBatches:
    """Index batches over a data set of size n, reshuffled each time it runs out (seeded)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        # Indices of the current shuffle not served yet: with the generator's state, all a
        # checkpoint needs to continue the same sequence of batches.
        self.pending: list[int] = []

    def next(self) -> list[int]:
        while len(self.pending) < self.batch_size:
            self.pending += torch.randperm(self.n, generator=self.generator).tolist()
        batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
        return batch


def tensorboard_writer(log_dir: Path) -> Any | None:
    """A TensorBoard SummaryWriter on `log_dir`, or None when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None  # TensorBoard is optional: metrics.jsonl is the record either way
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl` (the run's own record).

    When TensorBoard is installed the same scalars also go to `<stage>/tensorboard/`
    (`tensorboard --logdir RUN` shows every stage).
    """

    def __init__(self, path: Path, resume: bool = False, tensorboard: bool = True):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a" if resume else "w", encoding="utf-8")
        self._tb = tensorboard_writer(path.parent / "tensorboard") if tensorboard else None

    def log(self, step: int, **metrics: float) -> None:
        row = {"step": step}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else None
            if self._tb is not None and row[k] is not None:
                self._tb.add_scalar(k, v, step)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def progress_bar(description: str, total: int, enabled: bool = True) -> Progress:
    """A rich progress bar with step count and elapsed time; metrics go in the `info` field."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        transient=False,
    )
    progress.add_task(description, total=total, info="")
    return progress


class Stopwatch:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 2)
