"""How the RL loops split work over the processes of `accelerate launch` and put it back together.

Every process draws the same global batch (same seed); process r works on one contiguous
block of its rows (`shard`) and the results are gathered in rank order, which is the global
order again. On one process every function here is the identity, so single-process runs do
exactly what they did before. The last functions deal with weights sharded over the processes
(FSDP, DeepSpeed ZeRO-3): saving them whole, and refusing them where a loop cannot work on shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from transformers import PreTrainedTokenizerBase

from rlhfkit.models.loading import save_model


def shard(n: int, rank: int, n_proc: int) -> slice:
    """The contiguous block of `n` rows that process `rank` of `n_proc` owns.

    Blocks differ in size by at most one (the first `n % n_proc` ranks take one more), so
    concatenating them in rank order gives back 0..n-1.
    """
    if n_proc < 1 or not 0 <= rank < n_proc:
        raise ValueError(f"shard: rank {rank} is not a process of {n_proc}")
    if n < 0:
        raise ValueError(f"shard: n must be >= 0, got {n}")
    size, extra = divmod(n, n_proc)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def require_divisible(name: str, value: int, n_proc: int) -> None:
    """Fail with a config-style message when `value` (the setting `name`) does not split evenly."""
    if value % n_proc:
        raise ValueError(f"{name} {value} is not divisible by the {n_proc} processes")


def gather_lists(accelerator: Accelerator, items: list[Any]) -> list[Any]:
    """Every process's list, concatenated in rank order (any picklable items; lengths may differ)."""
    if accelerator.num_processes == 1:
        return items
    return gather_object(items)


def gather_rows(accelerator: Accelerator, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor's rows from every process, concatenated in rank order (same shapes everywhere)."""
    if accelerator.num_processes == 1:
        return tensors
    return tuple(None if t is None else accelerator.gather(t.contiguous()) for t in tensors)


def mean_over_processes(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the processes (every process must pass the same keys)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)  # the same order on every process, whatever order the dicts were built in
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    reduced = dict(zip(keys, accelerator.reduce(stacked, "mean").tolist(), strict=True))
    return {k: reduced[k] for k in values}


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on at least one (e.g. a stop signal)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    raised = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(raised, "sum").item() > 0)


def weights_are_sharded(accelerator: Accelerator) -> bool:
    """True when no process holds the whole weights of a prepared model (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def refuse_sharded_sampling(accelerator: Accelerator, stage: str) -> None:
    """Stop before any work when `stage` would sample from a policy whose weights are sharded.

    The RL stages sample with the policy's own modules, outside the prepared forward in which
    FSDP or ZeRO-3 gathers the shards, and their checkpoints hold one process's optimiser
    state: neither is done for sharded weights yet, so such a launch fails here, not mid-run.
    """
    if weights_are_sharded(accelerator):
        raise ValueError(
            f"{stage} does not run with sharded weights (FSDP or DeepSpeed ZeRO-3) yet: it samples "
            "from the policy it trains; launch it with DDP (examples/accelerate/ddp.yaml) or ZeRO-2"
        )


def save_trained(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    part: str = "",
) -> None:
    """Save a trained model whole, from the main process; every process must call this.

    `model` is what `accelerator.prepare` returned, `part` the name of the submodule to save
    when it is a wrapper (`model` of a TokenValues). Sharded weights (FSDP, ZeRO-3) are
    gathered by accelerate (a collective, hence every process), so the folder loads with plain
    `from_pretrained` whatever the launch.
    """
    inner = accelerator.unwrap_model(model)
    inner = inner.get_submodule(part) if part else inner
    weights = None
    if weights_are_sharded(accelerator):
        whole = accelerator.get_state_dict(model)  # the main process's copy; empty elsewhere
        prefix = f"{part}." if part else ""
        # A tied weight (input embeddings = LM head) comes back as two tensors; keep its first name
        # only, as save_pretrained does for an unsharded model.
        seen: set[int] = set()
        tied = set()
        for name, param in inner.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                tied.add(name)
            seen.add(id(param))
        weights = {
            key.removeprefix(prefix): value
            for key, value in whole.items()
            if key.startswith(prefix) and key.removeprefix(prefix) not in tied
        }
    if accelerator.is_main_process:
        save_model(inner, tokenizer, out_dir, state_dict=weights)
    accelerator.wait_for_everyone()
