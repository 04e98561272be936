"""Two CPU processes (gloo) give SFT, reward-model, DPO, PPO, GRPO/RLOO and KTO losses equal to one process.

Each process takes its share of the global batch and the losses are normalised so that the
gradient averaged by DDP is the one-process gradient; only float summation order differs,
so the test allows 1e-5 (relative) on every logged loss. Runs last 4 steps under a decaying
learning rate: later losses depend on earlier updates and on the schedule keeping pace.
Weights are not compared element-wise: Adam turns the ~1e-12 noise on gradients that should
be zero (the pad embedding row) into steps of size lr.

PPO is compared with one process using gradient accumulation (grad_accum=2): its two
micro-batches are exactly the two processes' blocks of each mini-batch. Responses are sampled
with `rollout.seed_per_prompt`, so both runs train on the same tokens. What differs is float
rounding only: the rollout scored in blocks of 4 rows instead of 8, and gradients summed by
gloo; 1e-4 (relative, absolute below 1) leaves room for that noise carried through three
steps of Adam, and is far below what a wrong normalisation moves (a per-process token mean,
or DDP's average left unscaled, changes the gradient norm by a factor near 2).

GRPO/RLOO and KTO are compared with one process on the same settings (each mini-batch's loss
is divided by the whole mini-batch's counts, so no accumulation is needed), at the same 1e-4.

Under FSDP (the shipped examples/accelerate/fsdp.yaml) SFT, the reward model, DPO, IPO and KTO, then
PPO, A2C, PPO with frozen lower layers, GRPO, RLOO and REINFORCE++ (gradient checkpointing in KTO and
in the frozen-layer PPO) are compared with one process as above and their saved models must load whole. A
2-process PPO run killed after a checkpoint and resumed on 2 processes must end bit-identical to an
uninterrupted one, under DDP and under FSDP.

Under DeepSpeed (the shipped ZeRO-2 and ZeRO-3 configs) the preference stages of the FSDP test, and under
ZeRO-3 every RL run of the FSDP RL test, are compared with the same one-process runs; a PPO run resumed
from a ZeRO-3 checkpoint ends bit-identical. PPO and GRPO also run under ZeRO-2 in bf16.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.models.loading import load_reward_model, load_tokenizer, save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.train.checkpoint import latest_resumable, load_state

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from rlhfkit.config import load_config
    from rlhfkit.train.dpo import run_dpo
    from rlhfkit.train.rm import run_rm
    from rlhfkit.train.sft import run_sft

    init, out = Path(sys.argv[1]), Path(sys.argv[2])
    prompts = [f"Say a colour number {i}." for i in range(8)]
    # Two epochs: several steps under a decaying learning rate, so the schedule must keep pace too.
    config = load_config(overrides=["sft.batch_size=4", "sft.epochs=2", "rm.batch_size=4", "rm.epochs=2",
                                    "rm.val_share=0", "sft.warmup_ratio=0", "rm.warmup_ratio=0"])
    run_sft(config, init, [{"prompt": p, "completion": "red " * (i % 3 + 1)} for i, p in enumerate(prompts)],
            out / "sft", show_progress=False)
    run_rm(config, init, [{"prompt": p, "chosen": "red", "rejected": "blue " * (i % 2 + 1)}
                          for i, p in enumerate(prompts)], out / "rm", show_progress=False)
    # DPO with precomputed reference log-probs (each process computes its block of them), then
    # IPO with the reference live in every step.
    pairs = [{"prompt": p, "chosen": "red " * (i % 2 + 1), "rejected": "blue"} for i, p in enumerate(prompts)]
    dpo = ["dpo.batch_size=4", "dpo.epochs=2", "dpo.warmup_ratio=0", "dpo.lr=1e-3"]
    run_dpo(load_config(overrides=dpo), init, pairs, out / "dpo", show_progress=False)
    run_dpo(load_config(overrides=dpo + ["dpo.loss_type=ipo", "dpo.precompute_reference=false"]), init, pairs,
            out / "dpo_live", show_progress=False)
    from accelerate import PartialState
    state = PartialState()
    (out / f"rank{state.process_index}-of-{state.num_processes}").touch()
    """
)


@pytest.fixture(scope="module")
def init_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mp") / "init"
    tokenizer = train_tokenizer(["Say a colour number 3. red", "blue green red yellow"] * 40, vocab_size=300)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    save_model(model, tokenizer, folder)
    return folder


def _launch_command(n_processes: int, *target: str | Path, config_file: Path | None = None) -> list[str]:
    """`accelerate launch` of `target` (a script and its arguments, or -m and a module) on CPU processes.

    `--cpu` alone runs one process; the torchrun launcher (--multi_gpu) with ACCELERATE_USE_CPU
    (`LAUNCH_ENV`) starts n CPU processes that join a gloo group. `config_file` replaces
    --multi_gpu with an accelerate config (the command-line settings here override its own).
    """
    if config_file is not None:
        mode = ["--config_file", str(config_file)]
    else:
        mode = ["--multi_gpu" if n_processes > 1 else "--cpu"]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *mode,
        "--num_processes",
        str(n_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *map(str, target),
    ]


LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def _launch(
    n_processes: int, script: Path, *args: Path, config_file: Path | None = None, env: dict | None = None
) -> None:
    cmd = _launch_command(n_processes, script, *args, config_file=config_file)
    done = subprocess.run(cmd, env=env or LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(init_folder, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    for n in (1, 2):
        _launch(n, script, init_folder, tmp_path / f"p{n}")
    # Really two processes, each seeing the world size.
    assert sorted(p.name for p in (tmp_path / "p2").glob("rank*")) == ["rank0-of-2", "rank1-of-2"]
    for stage in ("sft", "rm", "dpo", "dpo_live"):
        one, two = (
            _losses(tmp_path / "p1" / stage / "metrics.jsonl"),
            _losses(tmp_path / "p2" / stage / "metrics.jsonl"),
        )
        assert len(one) == len(two) >= 1
        for a, b in zip(one, two, strict=True):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (stage, one, two)
        # Both runs trained (the losses are equal because both moved, not because neither did).
        w0 = load_file(str(init_folder / "model.safetensors"))
        w2 = load_file(str(tmp_path / "p2" / stage / "model" / "model.safetensors"))
        assert any(not torch.equal(w0[k], w2[k]) for k in w0 if k in w2)


# The start of every script launched with examples/accelerate/fsdp.yaml: real FSDP2 on the CPU gloo
# group, and `units`, the number of FSDP units of each model accelerate prepares.
FSDP_PRELUDE = textwrap.dedent(
    """
    import os
    import accelerate
    from accelerate import PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule

    sharded = os.environ.get("ACCELERATE_USE_FSDP") == "true"
    if sharded:
        # accelerate (1.15) turns FSDP on for accelerator devices only: on a CPU gloo group it
        # silently runs DDP. Torch's FSDP2 itself runs on CPU, so take accelerate's FSDP branch:
        # the group is set up as for CPU, then its type is named as the GPU one FSDP starts from.
        PartialState(cpu=True)
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    # The number of FSDP units of each prepared model (blocks sharded one by one, or not).
    units = []
    prepare = accelerate.Accelerator.prepare

    def counted_prepare(self, *objects):
        prepared = prepare(self, *objects)
        units.extend(sum(isinstance(m, FSDPModule) for m in obj.modules())
                     for obj in prepared if hasattr(obj, "modules"))
        return prepared

    accelerate.Accelerator.prepare = counted_prepare
    # The number of block forwards run under activation checkpointing (model.gradient_checkpointing):
    # transformers looks its checkpoint function up here when a model turns checkpointing on.
    import transformers.modeling_utils as modeling_utils
    checkpointed = []
    checkpoint = modeling_utils.checkpoint

    def counted_checkpoint(*args, **kwargs):
        checkpointed.append(1)
        return checkpoint(*args, **kwargs)

    modeling_utils.checkpoint = counted_checkpoint
    """
)

FSDP_SCRIPT = FSDP_PRELUDE + textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from rlhfkit.config import load_config
    from rlhfkit.train.dpo import run_dpo
    from rlhfkit.train.kto import run_kto
    from rlhfkit.train.ppo import run_ppo
    from rlhfkit.train.rm import run_rm
    from rlhfkit.train.sft import run_sft

    init, out = Path(sys.argv[1]), Path(sys.argv[2])
    prompts = [f"Say a colour number {i}." for i in range(8)]
    config = load_config(overrides=["sft.batch_size=4", "sft.epochs=2", "rm.batch_size=4", "rm.epochs=2",
                                    "rm.val_share=0", "sft.warmup_ratio=0", "rm.warmup_ratio=0"])
    # The reward model first: accelerate's FSDP plugin keeps the block class it found in the first model it
    # wrapped, and TokenValues must name it itself.
    rm_pairs = [{"prompt": p, "chosen": "red", "rejected": "blue " * (i % 2 + 1)}
                for i, p in enumerate(prompts)]
    run_rm(config, init, rm_pairs, out / "rm", show_progress=False)
    run_sft(config, init, [{"prompt": p, "completion": "red " * (i % 3 + 1)} for i, p in enumerate(prompts)],
            out / "sft", show_progress=False)
    # DPO with the reference live in every step: a second, unprepared model next to the sharded policy.
    pairs = [{"prompt": p, "chosen": "red " * (i % 2 + 1), "rejected": "blue"} for i, p in enumerate(prompts)]
    dpo = ["dpo.batch_size=4", "dpo.epochs=2", "dpo.warmup_ratio=0", "dpo.lr=1e-3",
           "dpo.precompute_reference=false"]
    run_dpo(load_config(overrides=dpo), init, pairs, out / "dpo", show_progress=False)
    # IPO (length-averaged log-probs) with reference log-probs precomputed in blocks and gathered.
    run_dpo(load_config(overrides=dpo[:-1] + ["dpo.loss_type=ipo"]), init, pairs, out / "ipo",
            show_progress=False)
    # KTO (z0 from the gathered batch) with gradient checkpointing: the blocks' forwards run again in
    # the backward, inside the FSDP units that gather their shards for it.
    examples = [{"prompt": p, "completion": ("red " if i % 2 else "blue ") * (i % 3 + 1), "label": i % 2 == 1}
                for i, p in enumerate(prompts)]
    kto = ["kto.batch_size=4", "kto.epochs=2", "kto.warmup_ratio=0", "kto.lr=2e-3", "kto.beta=1.0",
           "kto.precompute_reference=false", "model.gradient_checkpointing=true"]
    before_kto = len(checkpointed)
    run_kto(load_config(overrides=kto), init, examples, out / "kto", show_progress=False)
    refused = {}
    if sharded:
        # The RL stages run under FSDP2 (test_rl_stages_under_fsdp_match_one_process...), LoRA ones do not,
        # and no stage trains LoRA on shards (it would fail only at the save, after training).
        lora = load_config(overrides=["lora.enabled=true"])
        for name, run in {
            "ppo": lambda: run_ppo(lora, init, init, prompts, out / "ppo", show_progress=False),
            "sft": lambda: run_sft(lora, init, [{"prompt": "a", "completion": "b"}], out / "sft_lora",
                                   show_progress=False),
        }.items():
            try:
                run()
            except ValueError as exc:
                refused[name] = str(exc)
    state = accelerate.state.AcceleratorState()
    (out / f"rank{state.process_index}-of-{state.num_processes}.json").write_text(json.dumps(
        {"distributed_type": str(state.distributed_type), "units": units, "refused": refused,
         "checkpointed": {"before_kto": before_kto, "kto": len(checkpointed) - before_kto}}))

    # The reward model again, stopped by SIGTERM to the main process after step 2 (every process saves
    # its part of the checkpoint: sharded weights and optimiser states are gathered), then resumed.
    import signal
    from rlhfkit.train.checkpoint import TrainingInterrupted
    from rlhfkit.train.loop import MetricsLog
    log_step = MetricsLog.log

    def stop_after_2(self, step, **row):
        log_step(self, step, **row)
        if step == 2:
            signal.raise_signal(signal.SIGTERM)

    MetricsLog.log = stop_after_2
    try:
        run_rm(config, init, rm_pairs, out / "rm_resumed", show_progress=False)
    except TrainingInterrupted as exc:
        rm_stopped = exc.step
    MetricsLog.log = log_step
    rm_resumed = run_rm(config, init, rm_pairs, out / "rm_resumed", show_progress=False, resume=True)
    (out / f"rm-resume-rank{state.process_index}.json").write_text(json.dumps(
        {"stopped": rm_stopped, "resumed_from": rm_resumed["resumed_from"]}))
    """
)

# DeepSpeed on CPU processes. The launches run without ACCELERATE_USE_CPU (accelerate skips DeepSpeed
# under it); DeepSpeed picks its CPU accelerator itself when no GPU is found.
DEEPSPEED_ENV = {k: v for k, v in LAUNCH_ENV.items() if k != "ACCELERATE_USE_CPU"}
ZERO_YAML = {
    stage: Path(__file__).resolve().parents[1] / "examples" / "accelerate" / f"deepspeed_zero{stage}.yaml"
    for stage in (2, 3)
}
DEEPSPEED_PRELUDE = textwrap.dedent(
    """
    import os
    from accelerate import PartialState

    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # accelerate (1.15) names a process-group backend for accelerator devices only: on CPU it
        # hands DeepSpeed none, and then counts 1 process while DeepSpeed's group has 2. Naming gloo
        # (the backend DeepSpeed's CPU accelerator uses) sets the group up with the right count.
        PartialState(backend="gloo")
    """
)
# After FSDP_SCRIPT under DeepSpeed: what the launch was, and LoRA's refusal of ZeRO-3's sharded weights.
DEEPSPEED_SUFFIX = textwrap.dedent(
    """
    from accelerate.state import AcceleratorState

    ds = AcceleratorState()
    zero = None if ds.deepspeed_plugin is None else ds.deepspeed_plugin.zero_stage
    if zero is not None:
        refused = {}
        if zero == 3:
            lora = load_config(overrides=["lora.enabled=true"])
            try:
                run_dpo(lora, init, pairs, out / "dpo_lora", show_progress=False)
            except ValueError as exc:
                refused["dpo"] = str(exc)
        (out / f"deepspeed-rank{ds.process_index}.json").write_text(json.dumps({
            "distributed_type": str(ds.distributed_type), "zero_stage": ds.deepspeed_plugin.zero_stage,
            "processes": ds.num_processes, "refused": refused}))
    """
)
# FSDP_SCRIPT as every sharded launch (FSDP2, ZeRO-2, ZeRO-3) and its one-process baseline run it.
SHARDED_SCRIPT = DEEPSPEED_PRELUDE + FSDP_SCRIPT + DEEPSPEED_SUFFIX


@pytest.fixture(scope="module")
def sharded_runs(init_folder, tmp_path_factory) -> Path:
    """A folder holding SHARDED_SCRIPT (train.py) and its run on one process (p1)."""
    root = tmp_path_factory.mktemp("sharded")
    (root / "train.py").write_text(SHARDED_SCRIPT)
    _launch(1, root / "train.py", init_folder, root / "p1")
    return root


def _check_rm_resumed(run: Path) -> None:
    """The reward model stopped after step 2 and resumed ends with the uninterrupted run's bytes and
    metrics (same launch: the same operations in the same order). Under FSDP2 this caught processes
    updating their shards with different AdamW kernels (a resume then switched one of them)."""
    for rank in (0, 1):
        seen = json.loads((run / f"rm-resume-rank{rank}.json").read_text())
        assert seen == {"stopped": 2, "resumed_from": 2}, seen
    for name in ("model/model.safetensors", "metrics.jsonl"):
        assert (run / "rm_resumed" / name).read_bytes() == (run / "rm" / name).read_bytes(), name


# Learning rate and steps of each stage in FSDP_SCRIPT: Adam moves a weight by at most about lr a step.
FSDP_STAGES = {"sft": (5e-4, 4), "rm": (3e-4, 4), "dpo": (1e-3, 4), "ipo": (1e-3, 4), "kto": (2e-3, 4)}


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_save_whole_models(init_folder, sharded_runs):
    """SFT, the reward model, DPO (live reference), IPO (precomputed reference) and KTO (live reference,
    gradient checkpointing) under FSDP2 (examples/accelerate/fsdp.yaml, full sharding, one unit per
    transformer block) on 2 CPU processes give the losses of one process on the same global batch,
    within 1e-5 relative (gradients are reduce-scattered instead of all-reduced: only the summation
    order differs; measured: at most 3.4e-7), and save whole models that load with plain
    from_pretrained. LoRA PPO refuses sharded weights with a clear error. The reward model stopped by
    SIGTERM after step 2 and resumed ends with the uninterrupted run's bytes."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _launch(2, sharded_runs / "train.py", init_folder, sharded_runs / "fsdp", config_file=FSDP_YAML)
    for rank in (0, 1):
        seen = json.loads((sharded_runs / "fsdp" / f"rank{rank}-of-2.json").read_text())
        assert seen["distributed_type"] == "DistributedType.FSDP", seen
        # Every prepared model (RM inside TokenValues, SFT, DPO, IPO, KTO) is sharded block by block: the two
        # decoder blocks and the root (3 units), plus accelerate's embeddings/head group (3 more)
        # for a bare causal LM. Unwrapped blocks would leave the whole model in one unit.
        assert seen["units"] == [3, 6, 6, 6, 6], seen
        for stage in ("ppo", "sft"):
            message = seen["refused"][stage]
            assert "lora.enabled" in message and "FSDP" in message and "ddp.yaml" in message, seen
        assert not (sharded_runs / "fsdp" / "sft_lora").exists()
        # Activation checkpointing ran in KTO (each block forward of the policy), and only there.
        assert seen["checkpointed"]["before_kto"] == 0 and seen["checkpointed"]["kto"] > 0, seen
    _check_rm_resumed(sharded_runs / "fsdp")
    w0 = load_file(str(init_folder / "model.safetensors"))
    for stage, (lr, steps) in FSDP_STAGES.items():
        one, two = (_losses(sharded_runs / run / stage / "metrics.jsonl") for run in ("p1", "fsdp"))
        assert len(one) == len(two) >= 1
        for a, b in zip(one, two, strict=True):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (stage, one, two)
        folder = sharded_runs / "fsdp" / stage / "model"
        auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
        model, info = auto.from_pretrained(folder, output_loading_info=True)
        # Whole tensors under every name: nothing missing, nothing of a shard's shape.
        assert not any(info.values()), info
        weights = load_file(str(folder / "model.safetensors"))
        reference = load_file(str(sharded_runs / "p1" / stage / "model" / "model.safetensors"))
        assert weights.keys() == reference.keys()
        # The weights one process trained, up to the few Adam steps of size lr that gradient noise
        # on rows that should get none (the pad embedding) can cause; a shard, a zero or a
        # garbled tensor is far off. Measured: at most 1.1e-6.
        for key, value in weights.items():
            assert value.shape == reference[key].shape, key
            assert torch.allclose(value, reference[key], rtol=0, atol=lr * steps), key
        assert any(not torch.equal(w0[k], weights[k]) for k in w0 if k in weights), stage
        logits = model(input_ids=torch.tensor([[1, 5, 7]])).logits
        assert torch.isfinite(logits).all()


# The PPO runs both multi-process PPO scripts make (DDP and FSDP): prompts, a PTX corpus, the common
# settings and three variants. separate: two epochs of two mini-batches with a separate critic (its
# own DDP module or sharded model). shared: a value head on the policy, per-mini-batch whitening, KL
# and entropy in the loss, PTX, reward normalisation over 5 samples (uneven blocks: 3 and 2), an extra
# reward term, early stop. a2c: one step per rollout over micro-batches of 2 rows.
PPO_RUNS = textwrap.dedent(
    """
    prompts = [f"Say a colour number {i}." for i in range(16)]
    corpus = ["Say a colour number 3. red", "blue green red yellow"] * 10
    common = ["ppo.steps=3", "ppo.rollout_batch=8", "ppo.minibatch=4", "ppo.grad_accum=2",
              "ppo.max_new_tokens=6", "ppo.save_every=2", "ppo.lr=1e-3", "ppo.critic_lr=1e-3",
              "rollout.seed_per_prompt=true", "pretrain.block_size=16"]
    variants = {
        "separate": [],
        "shared": ["ppo.critic=shared", "ppo.whiten_advantages=minibatch", "ppo.kl_mode=loss",
                   "ppo.kl_estimator=k3", "ppo.ent_coef=0.01", "ppo.ptx_coef=0.5", "ppo.ptx_batch=4",
                   "ppo.reward_norm=true", "ppo.reward_norm_samples=5", "ppo.reward_scaling=true",
                   "ppo.extra_rewards=[{fn: repetition_penalty}]", "ppo.target_kl=1e-8"],
        "a2c": ["ppo.algorithm=a2c", "ppo.minibatch=2"],
    }
    """
)

PPO_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import rlhfkit.rollout.sampler as sampler
    import rlhfkit.train.ppo as ppo
    from accelerate import PartialState
    from rlhfkit.config import load_config

    policy, rm, out = map(Path, sys.argv[1:4])
    # Count the rows this process samples and scores with the reward model.
    counts = {"sampled": [], "scored": []}
    sample, score = sampler.sample_responses, ppo.sequence_scores

    def counted_sample(model, prompts, **kw):
        counts["sampled"].append(len(prompts))
        return sample(model, prompts, **kw)

    def counted_score(model, ids, mask):
        counts["scored"].append(ids.size(0))
        return score(model, ids, mask)

    sampler.sample_responses, ppo.sequence_scores = counted_sample, counted_score
    """
) + PPO_RUNS + textwrap.dedent(
    """
    for name, extra in variants.items():
        counts = {"sampled": [], "scored": []}
        ppo.run_ppo(load_config(overrides=common + extra), policy, rm, prompts, out / name,
                    show_progress=False, ptx_corpus=corpus)
        state = PartialState()  # after run_ppo: its Accelerator set up the (CPU, gloo) processes
        rank_file = out / name / f"rank{state.process_index}-of-{state.num_processes}.json"
        rank_file.write_text(json.dumps(counts))
    """
)

PPO_COMPARED = ("loss/policy", "loss/value", "grad_norm", "reward/score", "kl", "entropy", "approxkl")


@pytest.fixture(scope="module")
def reward_folder(init_folder) -> Path:
    """A reward model made from the tiny policy (random head), saved next to it."""
    folder = init_folder.parent / "rm"
    tokenizer = load_tokenizer(init_folder)
    save_model(load_reward_model(init_folder, tokenizer.pad_token_id), tokenizer, folder)
    return folder


@pytest.mark.slow
def test_ppo_two_processes_match_one_with_gradient_accumulation(init_folder, reward_folder, tmp_path):
    script = tmp_path / "ppo.py"
    script.write_text(PPO_SCRIPT)
    for n in (1, 2):
        _launch(n, script, init_folder, reward_folder, tmp_path / f"p{n}")
    for variant in ("separate", "shared", "a2c"):
        one = [json.loads(x) for x in (tmp_path / "p1" / variant / "metrics.jsonl").read_text().splitlines()]
        two = [json.loads(x) for x in (tmp_path / "p2" / variant / "metrics.jsonl").read_text().splitlines()]
        # One record, written once (not once per process).
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3], variant
        for a, b in zip(one, two, strict=True):
            # Same responses: the seeded rollout does not depend on who sampled it.
            assert a["response_length"] == b["response_length"], (variant, a, b)
            keys = [k for k in PPO_COMPARED if k in a] + [k for k in a if k.startswith(("loss/", "reward/"))]
            for key in keys:
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (variant, key, a, b)
        if variant == "separate":
            assert all(
                abs(a["grad_norm/critic"] - b["grad_norm/critic"]) <= 1e-4 * max(1.0, a["grad_norm/critic"])
                for a, b in zip(one, two, strict=True)
            )
        # The policy moved (the losses agree because both runs trained, not because neither did).
        w0 = load_file(str(init_folder / "model.safetensors"))
        w2 = load_file(str(tmp_path / "p2" / variant / "model" / "model.safetensors"))
        assert any(not torch.equal(w0[k], w2[k]) for k in w0 if k in w2)
        # Each process sampled and scored its own half of every rollout.
        counts = {
            rank: json.loads((tmp_path / "p2" / variant / f"rank{rank}-of-2.json").read_text())
            for rank in (0, 1)
        }
        single = json.loads((tmp_path / "p1" / variant / "rank0-of-1.json").read_text())
        assert single["sampled"][-3:] == [8, 8, 8]
        for rank in (0, 1):
            assert counts[rank]["sampled"][-3:] == [4, 4, 4]
            assert counts[rank]["scored"][-3:] == [4, 4, 4]
        if variant == "shared":
            # Reward normalisation: 5 samples drawn 3 + 2, the whole set scored on each process.
            assert [counts[0]["sampled"][0], counts[1]["sampled"][0]] == [3, 2]
            assert counts[0]["scored"][0] == counts[1]["scored"][0] == single["scored"][0] == 5
        # A checkpoint holds every process's sampling RNG state.
        state = torch.load(
            tmp_path / "p2" / variant / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=False
        )
        assert len(state["torch_rng_per_process"]) == 2


CRITIC_FREE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import rlhfkit.rollout.sampler as sampler
    from accelerate import PartialState
    from rlhfkit.config import load_config
    from rlhfkit.train.grpo import run_critic_free
    from rlhfkit.train.kto import run_kto
    from rlhfkit.train.rewards import build_reward_functions

    policy, rm, out, kto_policy = map(Path, sys.argv[1:5])
    # Count the rows this process samples.
    counts = {"sampled": []}
    sample = sampler.sample_responses

    def counted_sample(model, prompts, **kw):
        counts["sampled"].append(len(prompts))
        return sample(model, prompts, **kw)

    sampler.sample_responses = counted_sample
    prompts = [f"Say a colour number {i}." for i in range(16)]
    # 4 prompts x 2 samples a step; a reward model and a programmable term, summed.
    rewards = "[{fn: reward_model}, {fn: repetition_penalty, weight: 0.5}]"
    common = ["steps=3", "prompts_per_step=4", "group_size=2", "max_new_tokens=6", "lr=1e-3",
              f"rewards={rewards}"]
    variants = {
        # DAPO's token-level loss over two epochs of two mini-batches (blocks of unequal token counts).
        "grpo": ("grpo", ["loss_normalisation=token", "update_epochs=2", "minibatch=4"]),
        # One update on the whole batch: the scoring forward is the update's.
        "grpo_single": ("grpo", ["update_epochs=1", "minibatch=8"]),
        # REINFORCE++: returns whitened over the whole batch, not per group.
        "reinforce_pp": ("rloo", ["advantage=reinforce_pp", "update_epochs=1", "minibatch=4"]),
    }
    for name, (section, extra) in variants.items():
        counts["sampled"] = []
        config = load_config(overrides=["rollout.seed_per_prompt=true"]
                             + [f"{section}.{o}" for o in common + extra])
        terms = build_reward_functions(getattr(config, section).rewards, rm)
        run_critic_free(config, section, policy, terms, prompts, out / name, show_progress=False)
        state = PartialState()
        rank_file = out / name / f"rank{state.process_index}-of-{state.num_processes}.json"
        rank_file.write_text(json.dumps(counts))
    examples = [{"prompt": p, "completion": ("red " if i % 2 else "blue ") * (i % 3 + 1), "label": i % 2 == 1}
                for i, p in enumerate(prompts[:8])]
    kto = ["kto.batch_size=4", "kto.epochs=2", "kto.warmup_ratio=0", "kto.lr=2e-3", "kto.beta=1.0"]
    run_kto(load_config(overrides=kto), kto_policy, examples, out / "kto", show_progress=False)
    run_kto(load_config(overrides=kto + ["kto.precompute_reference=false"]), kto_policy, examples,
            out / "kto_live", show_progress=False)
    """
)

CRITIC_FREE_COMPARED = ("loss", "clipfrac", "kl", "response_length", "entropy_proxy")


@pytest.fixture(scope="module")
def short_answer_folder(init_folder) -> Path:
    """The tiny policy after a little SFT on answers of 1 to 4 words.

    The random-init model almost always samples up to max_new_tokens; this one stops at lengths
    from 1 to 6, so the processes' blocks of a mini-batch hold different numbers of tokens.
    """
    from rlhfkit.config import load_config
    from rlhfkit.train.sft import run_sft

    demos = [{"prompt": f"Say a colour number {i}.", "completion": "red " * (i % 4 + 1)} for i in range(8)]
    config = load_config(overrides=["sft.batch_size=4", "sft.epochs=10", "sft.lr=1e-2", "sft.warmup_ratio=0"])
    run_sft(config, init_folder, demos, init_folder.parent / "short", show_progress=False)
    return init_folder.parent / "short" / "model"


KTO_COMPARED = ("loss", "kl_reference_point", "reward/desirable", "reward/undesirable", "log_value")


@pytest.mark.slow
def test_grpo_rloo_and_kto_two_processes_match_one(init_folder, short_answer_folder, reward_folder, tmp_path):
    """GRPO/RLOO: each process samples and scores whole groups of its block of prompts; advantages
    are computed on the gathered batch, and each mini-batch's loss is divided by its own counts,
    so 2 processes equal 1 process with the same settings (no accumulation needed). KTO: equal
    blocks of each batch, the reference point z0 from the gathered batch."""
    script = tmp_path / "critic_free.py"
    script.write_text(CRITIC_FREE_SCRIPT)
    for n in (1, 2):
        _launch(n, script, short_answer_folder, reward_folder, tmp_path / f"p{n}", init_folder)
    for variant in ("grpo", "grpo_single", "reinforce_pp", "kto", "kto_live"):
        one = [json.loads(x) for x in (tmp_path / "p1" / variant / "metrics.jsonl").read_text().splitlines()]
        two = [json.loads(x) for x in (tmp_path / "p2" / variant / "metrics.jsonl").read_text().splitlines()]
        # One record, written once (not once per process).
        assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, len(one) + 1)), variant
        kto = variant.startswith("kto")
        assert len(one) == (4 if kto else 3)
        compared = KTO_COMPARED if kto else CRITIC_FREE_COMPARED
        for a, b in zip(one, two, strict=True):
            keys = [k for k in compared if k in a] + [k for k in a if k.startswith("reward/")]
            for key in keys:
                if a[key] is None:  # a batch without thumbs-down examples has no undesirable reward
                    assert b[key] is None, (variant, key, a, b)
                    continue
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (variant, key, a, b)
        if kto:
            # z0 moved off its floor of 0, so a per-block estimate would have shown (measured: it
            # moves the later steps' rewards by up to 5e-3; the two runs differ by at most 2e-6).
            assert max(r["kl_reference_point"] for r in one) > 1e-3, one
        else:
            # Responses of different lengths: the blocks' token counts differ.
            assert min(r["response_length"] for r in one) < 5, one
            # Each process sampled its own half (whole groups) of every step's 8 responses.
            single = json.loads((tmp_path / "p1" / variant / "rank0-of-1.json").read_text())
            assert single["sampled"] == [8, 8, 8]
            for rank in (0, 1):
                counts = json.loads((tmp_path / "p2" / variant / f"rank{rank}-of-2.json").read_text())
                assert counts["sampled"] == [4, 4, 4], (variant, rank)
        # The policy moved (the numbers agree because both runs trained, not because neither did).
        w0 = load_file(str((init_folder if kto else short_answer_folder) / "model.safetensors"))
        w2 = load_file(str(tmp_path / "p2" / variant / "model" / "model.safetensors"))
        assert any(not torch.equal(w0[k], w2[k]) for k in w0 if k in w2)


COLOURS_TASK = textwrap.dedent(
    """
    from rlhfkit.tasks import Task

    def build(seed):
        prompts = [f"Say a colour number {i}." for i in range(12)]
        return Task(name="colours", train_prompts=prompts, heldout_prompts=prompts[:4],
                    demonstrations=[{"prompt": p, "completion": "red"} for p in prompts])
    """
)


# `rlhfkit ...` whose main process dies by SIGKILL as soon as it has written the PPO checkpoint of
# step 2 (torchrun then stops the other): a kill right after a checkpoint, at the same point every time.
KILLED_AFTER_STEP_2 = textwrap.dedent(
    """
    import os, signal, sys
    import rlhfkit.train.checkpoint as checkpoints
    from rlhfkit.cli import app

    save = checkpoints.save_checkpoint

    def save_then_die(root, step, *args, **kwargs):
        path = save(root, step, *args, **kwargs)
        if step == 2:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return path

    checkpoints.save_checkpoint = save_then_die
    app(sys.argv[1:])
    """
)


@pytest.mark.slow
def test_ppo_two_processes_killed_and_resumed_end_bit_identical(init_folder, reward_folder, tmp_path):
    """`rlhfkit ppo` on 2 processes, killed (SIGKILL: no chance to save anything more) right after
    its step-2 checkpoint and run again with --resume on 2 processes, ends with the very bytes and
    metrics of an uninterrupted 2-process run. Bit-identical, not within a tolerance: both runs do
    the same operations in the same order (gloo sums in a fixed order for a fixed world size), and
    the checkpoint holds all a continuation needs, including each process's own sampling RNG
    state (the processes sample with seed + rank here, not per-prompt seeds)."""
    (tmp_path / "colours_task.py").write_text(COLOURS_TASK)
    killer = tmp_path / "killed_after_step_2.py"
    killer.write_text(KILLED_AFTER_STEP_2)
    env = {**LAUNCH_ENV, "PYTHONPATH": str(tmp_path)}
    sets = "ppo.steps=6 ppo.save_every=2 ppo.rollout_batch=4 ppo.minibatch=2 ppo.max_new_tokens=6"
    sets += " ppo.reward_norm_samples=4 data.task=colours_task"

    def ppo(entry: list[str | Path], run: Path, *extra: str) -> subprocess.CompletedProcess:
        shutil.copytree(init_folder, run / "sft" / "model", dirs_exist_ok=True)
        shutil.copytree(reward_folder, run / "rm" / "model", dirs_exist_ok=True)
        overrides = [arg for setting in sets.split() for arg in ("--set", setting)]
        cmd = _launch_command(2, *entry, "ppo", "--out", run, "--no-progress", *overrides, *extra)
        # Its own session: whatever process group the kill reaches, it is not pytest's.
        return subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
        )

    reference, run = tmp_path / "uninterrupted", tmp_path / "interrupted"
    done = ppo(["-m", "rlhfkit"], reference)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = ppo([killer], run)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert len((run / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (run / "ppo" / "model").exists()
    saved = latest_resumable(run / "ppo" / "checkpoints")
    assert saved is not None and saved.name == "step-2"
    assert len(load_state(saved)["torch_rng_per_process"]) == 2

    # The same checkpoint resumed by one process (a smaller launch, no accelerate) goes on, with a
    # warning: its 2 sampling streams cannot become 1, so it is not an exact continuation.
    one = tmp_path / "resumed_on_one"
    shutil.copytree(run, one)
    alone = subprocess.run(
        [sys.executable, "-m", "rlhfkit", "ppo", "--out", one, "--no-progress", "--resume",
         *[arg for setting in sets.split() for arg in ("--set", setting)]],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "saved by 2 process(es) and this launch has 1" in alone.stdout, alone.stdout
    reference_rows = [json.loads(x) for x in (reference / "ppo" / "metrics.jsonl").read_text().splitlines()]
    one_rows = [json.loads(x) for x in (one / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one_rows] == [1, 2, 3, 4, 5, 6]
    assert one_rows[:2] == reference_rows[:2]

    resumed = ppo(["-m", "rlhfkit"], run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(step 2)" in resumed.stdout, resumed.stdout

    expected = (reference / "ppo" / "model" / "model.safetensors").read_bytes()
    assert (run / "ppo" / "model" / "model.safetensors").read_bytes() == expected
    rows, ref_rows = (
        [json.loads(x) for x in (r / "ppo" / "metrics.jsonl").read_text().splitlines()]
        for r in (run, reference)
    )
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows == ref_rows


RL_FSDP_SCRIPT = FSDP_PRELUDE + textwrap.dedent(
    """
    import json, shutil, signal, sys
    from pathlib import Path
    import rlhfkit.rollout.generate as generate
    import rlhfkit.train.checkpoint as checkpoints
    import rlhfkit.train.ppo as ppo
    from rlhfkit.config import load_config
    from rlhfkit.train.grpo import run_critic_free
    from rlhfkit.train.rewards import build_reward_functions

    policy, untied, rm, out = map(Path, sys.argv[1:5])
    # The variants to run (and --resume); when none is named, all ("resume" under FSDP only).
    only = sys.argv[5:]
    # The number of tokens each sampling call of this process decoded.
    decoded = []
    decode = generate.decode

    def counted_decode(*args, **kwargs):
        new = decode(*args, **kwargs)
        decoded.append(new.size(1))
        return new

    generate.decode = counted_decode
    kill_at = int(os.environ.get("KILL_AFTER_STEP", "0"))
    if kill_at:
        # SIGKILL the launch (torchrun stops the other process) once the main process has written the
        # checkpoint of that step: no chance to save anything more.
        save = checkpoints.save_checkpoint

        def save_then_die(root, step, *args, **kwargs):
            path = save(root, step, *args, **kwargs)
            if step == kill_at:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            return path

        checkpoints.save_checkpoint = save_then_die

    """
) + PPO_RUNS + textwrap.dedent(
    """
    # The runs of PPO_RUNS (a2c on a policy with untied embeddings: as many parameters as its critic).
    ppo_variants = {
        **variants,
        # Only the newest two checkpoints keep their trainer state (the resume below reads step 2).
        "shared": variants["shared"] + ["ppo.keep_states=2"],
        # The lower block and the (untied) input embeddings frozen, inside FSDP units whose other
        # parameters train, with gradient checkpointing: the blocks run again in the backward.
        "frozen": ["ppo.freeze_layers=1", "model.gradient_checkpointing=true"],
        # For the kill-and-resume test: each process samples with its own RNG stream (seed + rank), so
        # a resumed run must restore every process's stream; 4 steps, killed after the 2nd.
        "resume": ["ppo.steps=4", "rollout.seed_per_prompt=false"],
    }
    rewards = "[{fn: reward_model}, {fn: repetition_penalty, weight: 0.5}]"
    critic_free = ["steps=3", "prompts_per_step=4", "group_size=2", "max_new_tokens=6", "lr=1e-3",
                   f"rewards={rewards}"]
    critic_free_variants = {
        # DAPO's token-level loss over two epochs of two mini-batches.
        "grpo": ("grpo", ["loss_normalisation=token", "update_epochs=2", "minibatch=4"]),
        # RLOO with a single update: the scoring forward is the update's.
        "rloo": ("rloo", ["update_epochs=1", "minibatch=8"]),
        # REINFORCE++: returns whitened over the whole batch; one epoch of two mini-batches.
        "reinforce_pp": ("rloo", ["advantage=reinforce_pp", "update_epochs=1", "minibatch=4"]),
    }
    seen = {}

    def record(name):
        seen[name] = {"units": list(units), "decoded": list(decoded), "checkpointed": len(checkpointed)}
        units.clear()
        decoded.clear()
        checkpointed.clear()

    for name, extra in ppo_variants.items():
        if name in only or (not only and (name != "resume" or sharded)):
            config = load_config(overrides=common + extra)
            ppo.run_ppo(config, untied if name in ("a2c", "frozen") else policy, rm, prompts, out / name,
                        show_progress=False, ptx_corpus=corpus, resume="--resume" in only)
            record(name)
    if not only:
        # The shared-critic run again from its step-2 checkpoint (value head, PTX and the optimiser states
        # of a policy with a head): it must end as the run itself did.
        if PartialState().is_main_process:
            shutil.copytree(out / "shared", out / "shared_resumed")
            shutil.rmtree(out / "shared_resumed" / "checkpoints" / "step-3")
            shutil.rmtree(out / "shared_resumed" / "model")
        PartialState().wait_for_everyone()
        ppo.run_ppo(load_config(overrides=common + ppo_variants["shared"]), policy, rm, prompts,
                    out / "shared_resumed", show_progress=False, ptx_corpus=corpus, resume=True)
        record("shared_resumed")
        for name, (section, extra) in critic_free_variants.items():
            config = load_config(overrides=["rollout.seed_per_prompt=true"]
                                 + [f"{section}.{o}" for o in critic_free + extra])
            terms = build_reward_functions(getattr(config, section).rewards, rm)
            run_critic_free(config, section, policy, terms, prompts, out / name, show_progress=False)
            record(name)
    state = accelerate.state.AcceleratorState()
    (out / f"rank{state.process_index}-of-{state.num_processes}.json").write_text(
        json.dumps({"distributed_type": str(state.distributed_type), **seen}))
    """
)

FSDP_YAML = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp.yaml"
# The runs of RL_FSDP_SCRIPT compared with one process.
RL_FSDP_VARIANTS = ("separate", "shared", "a2c", "frozen", "grpo", "rloo", "reinforce_pp")


@pytest.fixture(scope="module")
def untied_folder(short_answer_folder) -> Path:
    """The short-answer policy with its output embedding a separate copy of the input one."""
    from rlhfkit.models.loading import load_causal_lm

    model = load_causal_lm(short_answer_folder)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    folder = short_answer_folder.parent / "untied"
    save_model(model, load_tokenizer(short_answer_folder), folder)
    return folder


@pytest.fixture(scope="module")
def rl_fsdp_runs(short_answer_folder, untied_folder, reward_folder, tmp_path_factory) -> Path:
    """The RL variants of RL_FSDP_SCRIPT on one process and under FSDP2 on two (folders p1, fsdp)."""
    root = tmp_path_factory.mktemp("rl_fsdp")
    script = root / "rl_fsdp.py"
    script.write_text(RL_FSDP_SCRIPT)
    models = (short_answer_folder, untied_folder, reward_folder)
    _launch(1, script, *models, root / "p1")
    _launch(2, script, *models, root / "fsdp", config_file=FSDP_YAML)
    return root


@pytest.mark.slow
def test_rl_stages_under_fsdp_match_one_process_and_save_whole_models(
    rl_fsdp_runs, short_answer_folder, untied_folder
):
    """PPO (separate and shared critic, A2C, frozen lower layers with gradient checkpointing), GRPO, RLOO
    and REINFORCE++ under FSDP2 (the shipped fsdp.yaml, one unit per block) on 2 CPU processes log the
    numbers of one process at every step, within 1e-4 relative (absolute below 1), and end with its
    weights within 1e-5.

    Why they can be close: the rollout samples with per-prompt seeds from whole weights (gathered once
    per rollout), so both runs train on the same tokens, and the losses are normalised as under DDP;
    only float rounding differs (rows scored in blocks, gradients reduce-scattered). Measured: at most
    8.3e-7 relative on a logged number (the explained variance) and 1.2e-7 on a weight, against weights
    that moved by 2e-3 to 7.6e-3; a missing factor of the number of processes doubles or halves
    `grad_norm`. The saved models load whole with plain from_pretrained, and checkpoints hold the
    optimiser states whole. A2C trains a policy with untied embeddings, which has as many parameters
    as its critic (accelerate's own FSDP gradient clipping fails on that). The frozen-layer run
    (`ppo.freeze_layers=1` on the untied policy) keeps the lower block and the input embeddings frozen
    inside FSDP units whose other parameters train: they end with their starting bytes."""
    from transformers import AutoModelForCausalLM

    p1, fsdp = rl_fsdp_runs / "p1", rl_fsdp_runs / "fsdp"
    ranks = [json.loads((fsdp / f"rank{r}-of-2.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["distributed_type"] == "DistributedType.FSDP", seen
        # Each prepared model is sharded block by block: the PPO actor (policy and value head in one
        # PolicyValue) and the separate critic (TokenValues) as 2 blocks + the root; the bare causal LM of
        # GRPO/RLOO with accelerate's embeddings/head group on top.
        expected_units = {"separate": [3, 3], "shared": [3], "a2c": [3, 3], "frozen": [3, 3], "grpo": [6],
                          "rloo": [6], "reinforce_pp": [6]}
        assert {name: seen[name]["units"] for name in expected_units} == expected_units, seen
        # Activation checkpointing ran where it was asked for (the policy's blocks), and only there.
        assert all((seen[name]["checkpointed"] > 0) == (name == "frozen") for name in RL_FSDP_VARIANTS), seen
    # The processes made the same number of sampling calls but decoded different numbers of tokens in
    # some of them (each stops when its own rows have ended): a forward that gathered the shards at
    # every token would have waited forever.
    for name in RL_FSDP_VARIANTS:
        widths = [ranks[r][name]["decoded"] for r in (0, 1)]
        assert len(widths[0]) == len(widths[1]) >= 3, (name, widths)
    assert any(ranks[0][name]["decoded"] != ranks[1][name]["decoded"] for name in RL_FSDP_VARIANTS), ranks

    for name in RL_FSDP_VARIANTS:
        untied = name in ("a2c", "frozen")
        w0 = load_file(str((untied_folder if untied else short_answer_folder) / "model.safetensors"))
        one = [json.loads(x) for x in (p1 / name / "metrics.jsonl").read_text().splitlines()]
        two = [json.loads(x) for x in (fsdp / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3], name
        for a, b in zip(one, two, strict=True):
            assert a.keys() == b.keys(), (name, a, b)
            assert a["response_length"] == b["response_length"], (name, a, b)
            for key in a:
                if a[key] is None:  # not finite (logged as null)
                    assert b[key] is None, (name, key, a, b)
                    continue
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (name, key, a, b)
        folder = fsdp / name / "model"
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values()), (name, info)  # whole tensors under every name
        weights = load_file(str(folder / "model.safetensors"))
        reference = load_file(str(p1 / name / "model" / "model.safetensors"))
        assert weights.keys() == reference.keys() == w0.keys(), name
        for key, value in weights.items():
            assert torch.allclose(value, reference[key], rtol=0, atol=1e-5), (name, key)
        assert max((weights[k] - w0[k]).abs().max().item() for k in w0) > 1e-3, name  # it trained
        if name == "frozen":
            # The lower block and the input embeddings kept their bytes; the block above them trained.
            frozen = [k for k in w0 if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"]
            assert len(frozen) > 1 and all(torch.equal(weights[k], w0[k]) for k in frozen), name
            assert max((weights[k] - w0[k]).abs().max().item() for k in w0 if "layers.1." in k) > 1e-3
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()

    # A checkpoint written under FSDP holds the policy whole, and whole optimiser states keyed by name.
    step2 = fsdp / "shared" / "checkpoints" / "step-2"
    state = load_state(step2)
    assert state["layout"] == "sharded (FSDP)" and state["value_head"]["weight"].shape == (1, 32)
    w0 = load_file(str(short_answer_folder / "model.safetensors"))
    embed = state["opt_policy"]["state"]["policy.model.embed_tokens.weight"]
    assert embed["exp_avg"].shape == w0["model.embed_tokens.weight"].shape
    assert load_file(str(step2 / "model.safetensors")).keys() == w0.keys()
    # The shared-critic run resumed from that checkpoint ends with the same bytes and numbers, on one
    # process and under FSDP (the value head, PTX and the policy's optimiser state came back whole).
    for run in (p1, fsdp):
        resumed = run / "shared_resumed"
        assert (resumed / "model" / "model.safetensors").read_bytes() == (
            run / "shared" / "model" / "model.safetensors"
        ).read_bytes(), run
        assert (resumed / "metrics.jsonl").read_text() == (run / "shared" / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_ppo_under_fsdp_killed_and_resumed_ends_bit_identical(
    rl_fsdp_runs, short_answer_folder, untied_folder, reward_folder
):
    """PPO under FSDP2 on 2 processes (separate critic, each process sampling from its own RNG stream),
    SIGKILLed right after its step-2 checkpoint and resumed on 2 processes, ends with the very bytes and
    metrics of the uninterrupted run (the "resume" variant of the fixture's FSDP launch). Bit-identical,
    as under DDP: the same operations in the same order, each process restoring its shard of the
    optimiser states from the whole states in the checkpoint, and its own sampling RNG state."""
    out, script = rl_fsdp_runs / "killed", rl_fsdp_runs / "rl_fsdp.py"
    models = (short_answer_folder, untied_folder, reward_folder)
    cmd = _launch_command(2, script, *models, out, "resume", config_file=FSDP_YAML)
    # Its own session: whatever process group the kill reaches, it is not pytest's.
    killed = subprocess.run(
        cmd,
        env={**LAUNCH_ENV, "KILL_AFTER_STEP": "2"},
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert killed.returncode != 0, killed.stderr[-3000:]
    run = out / "resume"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (run / "model").exists()
    saved = latest_resumable(run / "checkpoints")
    assert saved is not None and saved.name == "step-2"
    assert load_state(saved)["layout"] == "sharded (FSDP)"

    # Its optimiser states are keyed by parameter name: resuming it without FSDP is refused, not guessed.
    unsharded = _launch_command(1, script, *models, out, "resume", "--resume")
    refused = subprocess.run(unsharded, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0, refused.stderr
    assert "holds optimiser states sharded (FSDP)" in refused.stderr, refused.stderr
    assert latest_resumable(run / "checkpoints") == saved and not (run / "model").exists()

    resumed = subprocess.run(cmd + ["--resume"], env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = rl_fsdp_runs / "fsdp" / "resume"
    weights = (expected / "model" / "model.safetensors").read_bytes()
    assert (run / "model" / "model.safetensors").read_bytes() == weights
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (run / "metrics.jsonl").read_text() == (expected / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_deepspeed_zero3_matches_one_process_and_saves_whole_models(init_folder, sharded_runs):
    """SFT, the reward model, DPO (live reference), IPO (precomputed reference) and KTO (live reference,
    gradient checkpointing) under DeepSpeed ZeRO-3 (the shipped config) on 2 CPU processes give the
    losses of one process within 1e-5 relative and save whole models within 1e-5 of its weights
    (measured: at most 1.4e-6, for weights that moved by 7.5e-4 to 5e-3). What makes it work: each
    stage fills in the DeepSpeed config from its own settings (micro-batch, clipping; the loops
    prepare no data loader), the frozen reference is loaded whole (transformers would partition it,
    and it is never prepared) and saving gathers the weights. LoRA refuses ZeRO-3's sharded weights
    with an error naming DDP. The reward model stopped by SIGTERM after step 2 (each process's ZeRO
    partition saved) and resumed ends with the uninterrupted run's bytes. (ZeRO-2 matched as closely
    when checked by hand; in the suite it runs in the bf16 test below.)"""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run = sharded_runs / "zero3"
    _launch(2, sharded_runs / "train.py", init_folder, run, config_file=ZERO_YAML[3], env=DEEPSPEED_ENV)
    _check_rm_resumed(run)
    w0 = load_file(str(init_folder / "model.safetensors"))
    for rank in (0, 1):
        seen = json.loads((run / f"deepspeed-rank{rank}.json").read_text())
        assert seen["distributed_type"] == "DistributedType.DEEPSPEED", seen
        assert seen["zero_stage"] == 3 and seen["processes"] == 2, seen
        assert "lora.enabled" in seen["refused"]["dpo"] and "ZeRO-3" in seen["refused"]["dpo"], seen
    assert not (run / "dpo_lora").exists()
    for stage in FSDP_STAGES:
        one, two = (_losses(r / stage / "metrics.jsonl") for r in (sharded_runs / "p1", run))
        assert len(one) == len(two) >= 1
        for a, b in zip(one, two, strict=True):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (stage, one, two)
        auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
        model, info = auto.from_pretrained(run / stage / "model", output_loading_info=True)
        assert not any(info.values()), (stage, info)  # whole tensors under every name
        weights = load_file(str(run / stage / "model" / "model.safetensors"))
        reference = load_file(str(sharded_runs / "p1" / stage / "model" / "model.safetensors"))
        assert weights.keys() == reference.keys(), stage
        for key, value in weights.items():
            assert torch.allclose(value, reference[key], rtol=0, atol=1e-5), (stage, key)
        assert max((weights[k] - w0[k]).abs().max().item() for k in w0 if k in weights) > 5e-4, stage
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()


@pytest.fixture(scope="module")
def rl_zero3_run(rl_fsdp_runs, short_answer_folder, untied_folder, reward_folder) -> Path:
    """RL_FSDP_SCRIPT's variants under DeepSpeed ZeRO-3 on 2 processes (folder zero3 beside p1).

    ZeRO-3 only: it drives everything ZeRO-2 does (engines, accumulation, partitioned optimiser
    states) and gathers the weights besides; ZeRO-2's RL path runs in the bf16 test below (the suite's
    time is kept for that)."""
    script = rl_fsdp_runs / "rl_deepspeed.py"
    script.write_text(DEEPSPEED_PRELUDE + RL_FSDP_SCRIPT)
    models = (short_answer_folder, untied_folder, reward_folder)
    _launch(2, script, *models, rl_fsdp_runs / "zero3", config_file=ZERO_YAML[3], env=DEEPSPEED_ENV)
    return rl_fsdp_runs / "zero3"


@pytest.mark.slow
def test_rl_stages_under_deepspeed_zero3_match_one_process_and_resume_exactly(
    rl_fsdp_runs, rl_zero3_run, short_answer_folder, untied_folder, reward_folder
):
    """PPO (separate critic: two engines; shared critic with PTX; A2C; lower layers frozen with gradient
    checkpointing), GRPO, RLOO and REINFORCE++ under DeepSpeed ZeRO-3 on 2 CPU processes log the numbers
    of one process within 1e-4 relative (absolute below 1) and end with its weights within 1e-5.
    Measured: at most 1.2e-6 relative (a gradient norm above the clipping norm: DeepSpeed clipped) and
    1.5e-7 on a weight. PPO accumulates its micro-batches and steps each engine once per mini-batch;
    a loss divided again by DeepSpeed's accumulation count halves A2C's `grad_norm`. The rollout gathers
    the weights once and decodes without ZeRO-3's per-layer hooks: the processes decode different
    numbers of tokens in some rollouts, which per-layer gathering could not survive. Checkpoints hold
    every process's ZeRO partition of the optimiser states: the shared-critic run resumed from its
    step-2 checkpoint ends with the very bytes of the run itself, and resuming it on one process is
    refused."""
    p1 = rl_fsdp_runs / "p1"
    for name in (*RL_FSDP_VARIANTS, "shared_resumed"):
        one = [json.loads(x) for x in (p1 / name / "metrics.jsonl").read_text().splitlines()]
        two = [json.loads(x) for x in (rl_zero3_run / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3], name
        for a, b in zip(one, two, strict=True):
            assert a.keys() == b.keys(), (name, a, b)
            for key in a:
                if a[key] is None:
                    assert b[key] is None, (name, key, a, b)
                    continue
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (name, key, a, b)
        weights = load_file(str(rl_zero3_run / name / "model" / "model.safetensors"))
        reference = load_file(str(p1 / name / "model" / "model.safetensors"))
        assert weights.keys() == reference.keys(), name
        for key, value in weights.items():
            assert torch.allclose(value, reference[key], rtol=0, atol=1e-5), (name, key)
    # Clipping happened inside DeepSpeed's step (the norms logged are above ppo.max_grad_norm = 1).
    logged = [json.loads(x) for x in (rl_zero3_run / "separate" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["grad_norm"] for r in logged) > 1.0
    ranks = [json.loads((rl_zero3_run / f"rank{r}-of-2.json").read_text()) for r in (0, 1)]
    assert any(ranks[0][name]["decoded"] != ranks[1][name]["decoded"] for name in RL_FSDP_VARIANTS), ranks
    state = load_state(rl_zero3_run / "shared" / "checkpoints" / "step-2")
    assert state["layout"] == "partitioned over 2 processes (DeepSpeed ZeRO)"
    assert len(state["opt_policy"]) == 2 and state["opt_policy"][0]["zero_stage"] == 3
    resumed, whole = (rl_zero3_run / name / "model" for name in ("shared_resumed", "shared"))
    assert (resumed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    # The same checkpoint resumed on one process without DeepSpeed: refused before any step.
    out = rl_fsdp_runs / "zero3_on_one"
    shutil.copytree(rl_zero3_run / "shared", out / "shared")
    shutil.rmtree(out / "shared" / "model")
    models = (short_answer_folder, untied_folder, reward_folder)
    cmd = _launch_command(1, rl_fsdp_runs / "rl_deepspeed.py", *models, out, "shared", "--resume")
    refused = subprocess.run(cmd, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0, refused.stderr
    assert "partitioned over 2 processes (DeepSpeed ZeRO)" in refused.stderr, refused.stderr[-3000:]
    assert not (out / "shared" / "model").exists()


DEEPSPEED_BF16_SCRIPT = DEEPSPEED_PRELUDE + textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from rlhfkit.config import load_config
    from rlhfkit.train.dpo import run_dpo
    from rlhfkit.train.grpo import run_critic_free
    from rlhfkit.train.kto import run_kto
    from rlhfkit.train.ppo import run_ppo
    from rlhfkit.train.rewards import build_reward_functions

    init, rm, out = map(Path, sys.argv[1:4])
    prompts = [f"Say a colour number {i}." for i in range(16)]
    bf16 = ["model.dtype=bfloat16", "rollout.seed_per_prompt=true"]
    ppo = ["ppo.steps=1", "ppo.rollout_batch=8", "ppo.minibatch=4", "ppo.max_new_tokens=6",
           "ppo.critic=shared"]
    run_ppo(load_config(overrides=bf16 + ppo), init, rm, prompts, out / "ppo", show_progress=False)
    grpo = load_config(overrides=bf16 + ["grpo.steps=1", "grpo.prompts_per_step=4", "grpo.group_size=2",
                                         "grpo.max_new_tokens=6"])
    run_critic_free(grpo, "grpo", init, build_reward_functions(grpo.grpo.rewards, rm), prompts, out / "grpo",
                    show_progress=False)
    pairs = [{"prompt": p, "chosen": "red " * (i % 2 + 1), "rejected": "blue"}
             for i, p in enumerate(prompts[:8])]
    dpo = bf16 + ["dpo.batch_size=4", "dpo.epochs=1"]
    run_dpo(load_config(overrides=dpo), init, pairs, out / "dpo", show_progress=False)
    # LoRA: the reference is the policy with its adapter off (weights whole under ZeRO-2).
    run_dpo(load_config(overrides=dpo + ["lora.enabled=true"]), init, pairs, out / "dpo_lora",
            show_progress=False)
    examples = [{"prompt": p, "completion": ("red " if i % 2 else "blue ") * (i % 3 + 1), "label": i % 2 == 1}
                for i, p in enumerate(prompts[:8])]
    kto = ["kto.batch_size=4", "kto.epochs=1", "kto.precompute_reference=false"]
    run_kto(load_config(overrides=bf16 + kto), init, examples, out / "kto", show_progress=False)
    """
)


@pytest.mark.slow
def test_deepspeed_bf16_reference_runs_in_the_trained_precision(init_folder, reward_folder, tmp_path):
    """Under DeepSpeed ZeRO-2 with bf16 (the shipped config's precision) the frozen reference computes as
    the trained policy does: at step 1, where the two are equal, PPO's and GRPO's KL are exactly 0,
    KTO's loss exactly 0.5, DPO's implicit rewards 0 to within bf16's rounding of differently padded
    batches (its reference log-probs are precomputed in other batches), also with LoRA (reference: the
    adapter off). DeepSpeed casts the trained parameters to bf16 and runs no autocast; with the
    reference left in float32 the step-1 KL was -2.1e-3 (PPO) and -3.0e-3 (GRPO) per response, and
    DPO's chosen reward 1.5e-3."""
    script = tmp_path / "bf16.py"
    script.write_text(DEEPSPEED_BF16_SCRIPT)
    cmd = _launch_command(2, script, init_folder, reward_folder, tmp_path, config_file=ZERO_YAML[2])
    cmd[cmd.index("--mixed_precision") + 1] = "bf16"
    done = subprocess.run(cmd, env=DEEPSPEED_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first = {
        stage: json.loads((tmp_path / stage / "metrics.jsonl").read_text().splitlines()[0])
        for stage in ("ppo", "grpo", "dpo", "dpo_lora", "kto")
    }
    assert first["ppo"]["kl"] == 0.0 and first["grpo"]["kl"] == 0.0, first
    assert first["kto"]["loss"] == 0.5, first
    for dpo in ("dpo", "dpo_lora"):
        assert abs(first[dpo]["reward/chosen"]) <= 1e-4 and abs(first[dpo]["reward/rejected"]) <= 1e-4, first
    # Saved merged, with the adapter alone beside it.
    assert (tmp_path / "dpo_lora" / "model" / "adapter" / "adapter_config.json").is_file()
