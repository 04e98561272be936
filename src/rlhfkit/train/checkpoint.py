"""Checkpoints that resume a run exactly, and a clean stop on SIGINT/SIGTERM.

A checkpoint is a folder `checkpoints/step-N/`: the trained model as a Hugging Face model
folder (so any checkpoint loads with `from_pretrained`, e.g. for over-optimisation
sweeps) plus `trainer_state.pt` with everything else a bit-identical continuation needs:
the other models' weights, optimiser and schedule states, RNG states, controllers.
`StageCheckpoints` is how every training stage uses them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from accelerate import Accelerator
from rich.console import Console

from rlhfkit.models.loading import load_trainable, save_model
from rlhfkit.models.lora import load_adapter_weights
from rlhfkit.train.distributed import (
    any_process,
    gather_lists,
    load_optimizer_state,
    optimizer_layout,
    optimizer_state,
    pretrained_weights,
)
from rlhfkit.train.loop import MetricsLog, ShuffledBatches

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rlhfkit.config import RunConfig

STATE_FILE = "trainer_state.pt"
FINGERPRINT_FILE = "fingerprint.json"
console = Console()


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


def made_with(out_dir: Path, fingerprint: str) -> bool:
    """False when `out_dir/checkpoints` holds checkpoints made with a config of another fingerprint."""
    saved = Path(out_dir) / "checkpoints" / FINGERPRINT_FILE
    return not saved.is_file() or json.loads(saved.read_text()).get("fingerprint") == fingerprint


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


# What a trainer state may hold beyond what `torch.load(weights_only=True)` reads by itself (tensors,
# numbers, strings, lists, tuples, dicts): DeepSpeed ZeRO's optimiser state dicts carry its stage enum,
# its loss scaler and its records of parameter fragments.
_DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state saved with a checkpoint, read without running code from it.

    A checkpoint folder may come from elsewhere, and unpickling can run any code, so the file is read
    with `weights_only=True`, allowing only the few DeepSpeed types its optimiser states hold; a file
    that names any other Python object is refused before anything in it is unpickled.
    """
    path = checkpoint / STATE_FILE
    what_to_do = (
        "delete the checkpoint folder if you did not make it, or rerun without --resume to start over"
    )
    try:
        named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable trainer state ({exc}); {what_to_do}") from exc
    refused = sorted(named - set(_DEEPSPEED_GLOBALS))
    if refused:
        raise ValueError(
            f"{path} names Python objects that a trainer state never holds ({', '.join(refused)}); it was "
            f"not loaded, since unpickling them could run code: {what_to_do}"
        )
    allowed = [_import_global(name) for name in sorted(named)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} could not be loaded as a trainer state ({exc}); {what_to_do}") from exc


def _import_global(name: str) -> Any:
    """The class `module.Name` (one of `_DEEPSPEED_GLOBALS`)."""
    import importlib

    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


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


class StageCheckpoints:
    """One stage's checkpoints in `out_dir/checkpoints`: the one a resume continues from, and new ones.

    Every process of a launch makes one and calls `begin` and `after_step` (saving gathers state
    from all of them). The stage loads its trained weights with `load_trained` (before `prepare`),
    restores the rest of its own state from `state` when resuming, and runs its steps from
    `start_step + 1`; `after_step` saves every `settings.save_every` steps (0: never on a schedule),
    at the last step when `at_end`, and on SIGINT/SIGTERM, where it raises `TrainingInterrupted`.
    The `settings.keep_states` newest checkpoints keep their trainer state, older ones the weights.
    With `resume` it continues from the newest checkpoint made with the same `fingerprint` (config).
    """

    def __init__(
        self,
        stage: str,
        out_dir: Path,
        accelerator: Accelerator,
        settings: Any,
        *,
        resume: bool = False,
        fingerprint: str = "",
        at_end: bool = False,
    ):
        self.stage, self.accelerator = stage, accelerator
        self.save_every, self.keep_states, self.at_end = settings.save_every, settings.keep_states, at_end
        self.fingerprint = fingerprint
        self.root = out_dir / "checkpoints"
        self.main = accelerator.is_main_process
        self.path = latest_resumable(self.root) if resume else None
        if self.path is not None:
            if fingerprint and not made_with(out_dir, fingerprint):
                raise ValueError(
                    f"{self.path} was made with a different config ({stage} or an upstream stage "
                    "changed, or a data file they read); rerun without --resume to start over"
                )
        elif resume and self.main:
            console.print(f"[dim]{stage}: no checkpoint in {self.root}, starting from step 0[/dim]")
        self.state: dict[str, Any] | None = load_state(self.path) if self.path is not None else None
        self.layout = optimizer_layout(accelerator)
        if self.state is not None:
            # Optimiser states are saved per parameter position whole, per parameter name sharded, and
            # as each process's partition under DeepSpeed. (Checkpoints from before "layout" say
            # "sharded".)
            legacy = "sharded (FSDP)" if self.state.get("sharded") else "whole"
            saved_as = self.state.get("layout") or legacy
            if saved_as != self.layout:
                raise ValueError(
                    f"{self.path} holds optimiser states {saved_as} and this launch lays them out "
                    f"{self.layout}; resume it with a launch like the one that saved it, or rerun "
                    "without --resume"
                )
        self.start_step: int = self.state["step"] if self.state is not None else 0
        self._trained: tuple | None = None

    def load_trained(
        self,
        init_path: str | Path,
        config: RunConfig,
        task: Literal["causal_lm", "reward"] = "causal_lm",
        pad_token_id: int | None = None,
    ) -> PreTrainedModel:
        """The model the stage trains (`load_trainable`): the checkpoint's weights when resuming, else
        `init_path`'s. Under LoRA the base always comes from `init_path` (it never changes) and a
        resumed run puts the checkpoint's adapter onto it."""
        lora = config.lora.enabled
        start = self.path if self.path is not None and not lora else init_path
        model = load_trainable(start, config, task, pad_token_id)
        if lora and self.path is not None:
            load_adapter_weights(model, self.path)
        return model

    def trains(
        self,
        tokenizer: Any,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        gen: torch.Generator,
        batches: ShuffledBatches | None = None,
        part: str = "",
    ) -> None:
        """Name what a one-model stage's checkpoints hold besides the step and RNG states: the prepared
        `model` (saved as its submodule `part` when given), its optimiser and schedule, the data
        generator and the batches not served yet. Resuming, their states come back here."""
        self._trained = (tokenizer, model, optimizer, scheduler, gen, batches, part)
        if self.state is not None:
            load_optimizer_state(self.accelerator, model, optimizer, self.state["optimizer"])
            scheduler.load_state_dict(self.state["scheduler"])
            gen.set_state(self.state["gen"])
            if batches is not None:
                batches.pending = list(self.state["batch_order"])

    def _trained_contents(self) -> tuple[Any, Any, dict[str, torch.Tensor] | None, dict[str, Any]]:
        if self._trained is None:
            raise RuntimeError(f"{self.stage}: after_step needs `contents` or a call to `trains` first")
        tokenizer, model, optimizer, scheduler, gen, batches, part = self._trained
        unwrapped = self.accelerator.unwrap_model(model)
        state = {
            "optimizer": optimizer_state(self.accelerator, model, optimizer),
            "scheduler": scheduler.state_dict(),
            "gen": gen.get_state(),
        }
        if batches is not None:
            state["batch_order"] = list(batches.pending)
        weights = pretrained_weights(self.accelerator, model, part)
        return getattr(unwrapped, part) if part else unwrapped, tokenizer, weights, state

    def begin(self, seed: int, metrics: Path) -> MetricsLog | None:
        """Call once the models are prepared, just before the first step; the metrics log (main
        process only, else None).

        Resuming: this process's torch RNG states (CPU, and CUDA where it sampled) come back, and
        metrics logged after the checkpoint are dropped. Starting over: a previous run's checkpoints
        are removed, so they are never mistaken for this one's.
        """
        n_proc, rank = self.accelerator.num_processes, self.accelerator.process_index
        if self.state is not None:
            saved_rngs = self.state.get("torch_rng_per_process") or [self.state["torch_rng"]]
            saved_cuda = self.state.get("cuda_rng_per_process")
            if len(saved_rngs) == n_proc:
                torch.set_rng_state(saved_rngs[rank])
                if saved_cuda is not None and saved_cuda[rank] is not None and torch.cuda.is_available():
                    torch.cuda.set_rng_state(saved_cuda[rank])
            else:
                # Saved by another number of processes: distinct fresh streams, not an exact continuation.
                torch.manual_seed(seed + rank + n_proc * self.start_step)
                if self.main:
                    console.print(
                        f"[yellow]{self.stage}: {self.path} was saved by {len(saved_rngs)} process(es) and "
                        f"this launch has {n_proc}: the run continues, but not bit-identically[/yellow]"
                    )
            if self.main:
                _truncate_metrics(metrics, self.start_step)
                console.print(f"[dim]{self.stage}: resuming from {self.path} (step {self.start_step})[/dim]")
        elif self.main:
            shutil.rmtree(self.root, ignore_errors=True)
        return MetricsLog(metrics, resume=self.state is not None) if self.main else None

    def after_step(
        self,
        step: int,
        total: int,
        stop: StopFlag,
        log: MetricsLog | None,
        contents: Callable[[], tuple[Any, Any, dict[str, torch.Tensor] | None, dict[str, Any]]] | None = None,
    ) -> Path | None:
        """Save a checkpoint when one is due; on a stop signal (to any process) save and raise.

        `contents()` returns (model, tokenizer, weights, trainer state): the unwrapped trained model,
        its gathered whole weights when sharded (else None), and the stage's own state (optimisers,
        schedules, data order...); every process calls it, since gathering is a collective. Without
        it, what `trains` named is saved.
        """
        stopping = any_process(self.accelerator, bool(stop))  # a signal to one process stops them all
        # The last step needs no periodic checkpoint: the stage saves its model right after it.
        periodic = self.save_every and step % self.save_every == 0 and step < total
        due = periodic or (self.at_end and step == total)
        if not (due or stopping):
            return None
        rngs = gather_lists(self.accelerator, [torch.get_rng_state()])
        # On a GPU the rollout samples from this process's CUDA generator (set_seed alone would
        # restart its stream on resume).
        cuda_rngs = gather_lists(self.accelerator, [_cuda_rng_state()])
        model, tokenizer, weights, trainer = (contents or self._trained_contents)()
        path = self.root / f"step-{step}"
        if self.main:
            fingerprint = self.root / FINGERPRINT_FILE
            if not fingerprint.is_file():
                self.root.mkdir(parents=True, exist_ok=True)
                fingerprint.write_text(json.dumps({"fingerprint": self.fingerprint}))
            trainer = {"step": step, "layout": self.layout, "torch_rng": torch.get_rng_state(), **trainer}
            if len(rngs) > 1:
                trainer["torch_rng_per_process"] = rngs
            if any(state is not None for state in cuda_rngs):
                trainer["cuda_rng_per_process"] = cuda_rngs
            path = save_checkpoint(self.root, step, model, tokenizer, trainer, self.keep_states, weights)
        self.accelerator.wait_for_everyone()
        if stopping and step < total:
            if log is not None:
                log.close()
            raise TrainingInterrupted(self.stage, step, path)
        return path


def _cuda_rng_state() -> torch.Tensor | None:
    """This process's CUDA generator state (its current device), or None where CUDA was never used."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.get_rng_state()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint a resumed run continues from."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(row + "\n" for row in rows))
