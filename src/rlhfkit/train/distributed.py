"""How the RL loops split work over the processes of `accelerate launch` and put it back together.

Every process draws the same global batch (same seed); process r works on one contiguous
block of its rows (`shard`) and the results are gathered in rank order, which is the global
order again. On one process every function here is the identity, so single-process runs do
exactly what they did before. The last functions deal with weights sharded over the processes
(FSDP, DeepSpeed ZeRO-3): holding them whole for a rollout, gathering weights and optimiser states
whole for saving and checkpoints, and refusing the launches a loop cannot work with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from transformers import PreTrainedTokenizerBase

from rlhfkit.models.loading import load_causal_lm, save_model


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


def clip_grad_norm(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients of the prepared `model` to a total norm of `max_norm`; their norm before clipping.

    `accelerator.clip_grad_norm_`, except in two launches. Under FSDP2 accelerate first looks for the
    prepared model whose parameter list equals the one given by comparing the lists element by
    element, which fails ("Boolean value of Tensor ... is ambiguous") when another prepared model
    has as many parameters (PPO's critic next to a policy with untied embeddings); torch clips the
    sharded gradients itself there, as accelerate would: the norm is that of the whole gradient.
    Under DeepSpeed the model's engine clipped in its step (inside `backward`): this reads that
    engine's norm (accelerate would read the last prepared model's, whichever this is).
    """
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2:
        accelerator.unscale_gradients()
        return float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return float(model.get_global_grad_norm())
    return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))


def backward(accelerator: Accelerator, model: torch.nn.Module, loss: torch.Tensor, last: bool = True) -> None:
    """`accelerator.backward(loss)` for the prepared `model`, one of several micro-batches of a step.

    Under DeepSpeed each trained model has its own engine, which steps its optimiser (and clips) in
    the backward of the step's `last` micro-batch; accelerate would send every loss to the engine of
    the model prepared last (PPO's critic). Losses are already normalised over the whole step, so
    the engine does not divide them by its accumulation count again.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        accelerator.backward(loss)
        return
    model.set_gradient_accumulation_boundary(last)
    model.backward(loss, scale_wrt_gas=False)
    if last:
        model.step()


def optimizer_layout(accelerator: Accelerator) -> str:
    """How `optimizer_state` lays out optimiser states on this launch (a resume needs the same)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"partitioned over {accelerator.num_processes} processes (DeepSpeed ZeRO)"
    return "sharded (FSDP)" if weights_are_sharded(accelerator) else "whole"


def prepare_trained(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rows_per_process: int,
    max_grad_norm: float = 1.0,
    micro_batches: int = 1,
) -> tuple[Any, Any]:
    """`accelerator.prepare(model, optimizer)` for a model the loop trains in `micro_batches` per step.

    Under DeepSpeed the engine clips and steps the optimiser inside the backward of a step's last
    micro-batch (`optimizer.step()` is then a no-op; see `backward`), so its config is filled in
    from the loop first: the clipping norm the loop would apply, the micro-batches per step and the
    rows each process trains on in one, which DeepSpeed needs because the loops prepare no data
    loader. Elsewhere this is prepare.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        rows = max(1, rows_per_process)
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=rows,
            gradient_accumulation_steps=micro_batches,
            train_batch_size=rows * micro_batches * accelerator.num_processes,
            gradient_clipping=max_grad_norm,
        )
        # accelerate would otherwise warn that its own count (from the launch config) differs.
        accelerator.gradient_accumulation_steps = micro_batches
    return accelerator.prepare(model, optimizer)


def weights_are_sharded(accelerator: Accelerator) -> bool:
    """True when no process holds the whole weights of a prepared model (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def refuse_unsupported_sharding(accelerator: Accelerator, stage: str, lora: bool = False) -> None:
    """Stop before any work when `stage`, an RL stage, cannot run on this launch's sharded weights.

    The RL stages sample from the policy they train. Under FSDP2 and DeepSpeed ZeRO-3 the rollout
    holds the whole weights (`whole_weights`) and checkpoints gather weights whole; FSDP1 gathers
    weights in a way these loops do not drive, and a LoRA policy on sharded weights is not saved
    (merging needs whole weights). Each of these fails here, not mid-run.
    """
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(
            f"{stage} runs under FSDP2 only (fsdp_version: 2, as in examples/accelerate/fsdp.yaml), "
            "not FSDP1: it samples from the policy it trains through FSDP2's unshard()"
        )
    refuse_sharded_lora(accelerator, stage, lora)


def refuse_sharded_lora(accelerator: Accelerator, stage: str, lora: bool) -> None:
    """Stop before any work when `stage` would train a LoRA model on sharded weights (FSDP, ZeRO-3).

    A LoRA model is saved merged, which needs its whole weights (`save_model` refuses sharded ones):
    without this check a run would train to the end and fail at the save.
    """
    if lora and weights_are_sharded(accelerator):
        raise ValueError(
            f"{stage} with lora.enabled does not run on sharded weights (FSDP, DeepSpeed ZeRO-3) yet: "
            "a LoRA model is saved merged, which needs whole weights; launch it with DDP "
            "(examples/accelerate/ddp.yaml)"
        )


@contextmanager
def whole_weights(model: torch.nn.Module) -> Iterator[None]:
    """Every process holds the whole weights of the prepared `model` for the duration (FSDP2).

    Sampling calls the policy once per new token, and processes stop at different lengths. Under
    FSDP2 each call would all-gather the shards of every unit it runs (a collective), so every
    process would have to make the same number of calls, a collective stop decision at each token.
    Instead each unit is gathered once here and kept until the end: one all-gather per unit per
    rollout instead of one per unit per token, and the calls inside need no collective, so each
    process decodes at its own pace (and its own number of prompts). The price is the whole
    weights in memory while sampling, when the gradients are freed and optimiser states stay
    sharded. Without FSDP2 units (one process, DDP) this does nothing.
    """
    from torch.distributed.fsdp import FSDPModule

    if _zero3_offload(model) is not None:
        with _zero3_whole_weights(model):
            yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    # FSDP2 names as its root the first unit a forward runs through, and the sampler calls modules
    # inside the prepared one (the policy in PPO's PolicyValue): set the real root up first, or a
    # block would take that role and the next training forward would fail.
    units[0]._get_fsdp_state()._lazy_init()
    # A forward frees a unit's gathered weights after it (reshard after forward); inside, that would
    # undo the gathering below and make the next call all-gather again. Each group's own setting
    # (torch has no public getter for it) is put back afterwards.
    groups = [group for unit in units for group in unit._get_fsdp_state()._fsdp_param_groups]
    kept = [group.post_forward_mesh_info for group in groups]
    try:
        for group in groups:
            group.post_forward_mesh_info = None
        for unit in units:
            unit.unshard()  # one all-gather per unit, the same on every process
        yield
    finally:
        for group, info in zip(groups, kept, strict=True):
            group.post_forward_mesh_info = info
        for unit in units:
            unit.reshard()


def _zero3_offload(model: torch.nn.Module) -> Any | None:
    """The ZeRO-3 parameter coordinator (hooks and all) of a prepared DeepSpeed engine, else None."""
    optimizer = getattr(model, "optimizer", None)
    return getattr(optimizer, "parameter_offload", None)


@contextmanager
def _zero3_whole_weights(model: torch.nn.Module) -> Iterator[None]:
    """`whole_weights` under DeepSpeed ZeRO-3: every parameter gathered once, the per-layer hooks off.

    ZeRO-3's hooks gather each layer's parameters before its forward and free them after it (a
    collective per layer per call); with them on, decoding would need the same number of calls on
    every process. They are taken off for the rollout and put back after it (DeepSpeed internals:
    `parameter_offload`'s hook lists and `_register_deepspeed_module`, as of 0.19).
    """
    import deepspeed

    offload = _zero3_offload(model)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):  # one all-gather, every process
        for param in model.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


@contextmanager
def loading_whole() -> Iterator[None]:
    """Models loaded inside hold their whole weights on every process, also under DeepSpeed ZeRO-3.

    With ZeRO-3's `zero3_init_flag`, transformers builds every model it loads partitioned over the
    processes, for `prepare` to train. A frozen model (a reference, a reward model) is never
    prepared: partitioned, its forward would see empty weights. It is loaded whole instead (the
    price: one whole copy per process).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    # transformers partitions while accelerate's DeepSpeed config is registered with it (accelerate's
    # own zero3_init_context_manager re-registers it unchanged, so it does not help); put it back after.
    from accelerate.state import AcceleratorState

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        AcceleratorState().deepspeed_plugin.set_deepspeed_weakref()


def in_trained_precision(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """`model` (frozen, unprepared) cast to the dtype DeepSpeed gives the trained weights, if any.

    Under DDP and FSDP a frozen reference gets the policy's precision from `accelerator.autocast()`.
    DeepSpeed's mixed precision instead casts the trained model's parameters to bf16/fp16 (its
    buffers, such as RoPE's frequencies, stay float32) and runs no autocast (accelerate's is then a
    no-op): a float32 reference would give a KL that is not zero where policy and reference are
    equal (-2e-3 per response at step 1 in bf16, measured). The reference is cast the same way.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return model
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds_config.get(key, {}).get("enabled") is True:
            for param in model.parameters():
                param.data = param.data.to(dtype)
    return model


def load_reference(accelerator: Accelerator, path: str | Path, device: Any) -> torch.nn.Module:
    """The frozen reference policy from `path` on `device`: whole on every process, in the trained dtype."""
    with loading_whole():  # never prepared, so never partitioned (ZeRO-3)
        model = load_causal_lm(path)
    return in_trained_precision(accelerator, model).to(device).eval().requires_grad_(False)


def whole_state_dict(
    accelerator: Accelerator, model: torch.nn.Module, part: str = ""
) -> dict[str, torch.Tensor]:
    """The state dict of the prepared `model` (of its submodule `part` when given), whole.

    Sharded weights (FSDP, ZeRO-3) are gathered by accelerate, a collective: every process must
    call this, and only the main process gets the tensors (the others an empty dict). Otherwise
    it is the module's own `state_dict()` on every process.
    """
    inner = accelerator.unwrap_model(model)
    if not weights_are_sharded(accelerator):
        return (inner.get_submodule(part) if part else inner).state_dict()
    # The main process's copy; elsewhere empty (FSDP) or None (DeepSpeed ZeRO-3).
    whole = accelerator.get_state_dict(model) or {}
    prefix = f"{part}." if part else ""
    return {key.removeprefix(prefix): value for key, value in whole.items() if key.startswith(prefix)}


def pretrained_weights(
    accelerator: Accelerator, model: torch.nn.Module, part: str = ""
) -> dict[str, torch.Tensor] | None:
    """The weights `save_model` writes for the prepared `model` (its submodule `part`).

    None when every process holds them whole (save_pretrained reads the module's own). Sharded,
    they are gathered (every process must call this; the tensors reach the main process only),
    with a tied input/output embedding under its first name only, as save_pretrained writes it.
    """
    if not weights_are_sharded(accelerator):
        return None
    inner = accelerator.unwrap_model(model)
    inner = inner.get_submodule(part) if part else inner
    whole = whole_state_dict(accelerator, model, part)
    # A tied weight comes back as two tensors; keep its first name only.
    seen: set[int] = set()
    tied = set()
    for name, param in inner.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return {key: value for key, value in whole.items() if key not in tied}


def _full_state_options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def optimizer_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """What a checkpoint keeps of `optimizer` (prepared with `model`): its state dict, whole.

    Sharded (FSDP2), each process holds its shard of every state: they are gathered, keyed by
    parameter name (torch.distributed.checkpoint), a collective whose result reaches the main
    process only. DeepSpeed ZeRO partitions them (with the float32 master weights) over the processes:
    every process gets the list of their state dicts in rank order. Otherwise it is
    `optimizer.state_dict()`, the same on every process.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return gather_lists(accelerator, [optimizer.state_dict()])
    if not weights_are_sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    # accelerate's wrapper around the torch optimiser is not what the parameter names are mapped through.
    inner = getattr(optimizer, "optimizer", optimizer)
    return get_optimizer_state_dict(model, inner, options=_full_state_options(cpu_offload=True))


def load_optimizer_state(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, state: dict[str, Any]
) -> None:
    """Restore what `optimizer_state` returned (every process passes the whole state, keeps its shard).

    (DeepSpeed's optimiser takes the list of every process's state dicts and loads its own.)
    """
    if not weights_are_sharded(accelerator) or accelerator.distributed_type == DistributedType.DEEPSPEED:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, inner, state, options=_full_state_options())


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
    gathered (`pretrained_weights`, a collective, hence every process), so the folder loads with
    plain `from_pretrained` whatever the launch.
    """
    inner = accelerator.unwrap_model(model)
    inner = inner.get_submodule(part) if part else inner
    weights = pretrained_weights(accelerator, model, part)
    if accelerator.is_main_process:
        save_model(inner, tokenizer, out_dir, state_dict=weights)
    accelerator.wait_for_everyone()
