"""Two CPU processes (gloo) give SFT, reward-model, DPO and PPO losses equal to one process.

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
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.models.loading import load_reward_model, load_tokenizer, save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer

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


def _launch(n_processes: int, script: Path, *args: Path) -> None:
    # `--cpu` alone runs one process; the torchrun launcher (--multi_gpu) with ACCELERATE_USE_CPU
    # starts n CPU processes that join a gloo group.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu" if n_processes > 1 else "--cpu",
        "--num_processes",
        str(n_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        *map(str, args),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
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
    prompts = [f"Say a colour number {i}." for i in range(16)]
    corpus = ["Say a colour number 3. red", "blue green red yellow"] * 10
    common = ["ppo.steps=3", "ppo.rollout_batch=8", "ppo.minibatch=4", "ppo.grad_accum=2",
              "ppo.max_new_tokens=6", "ppo.save_every=2", "ppo.lr=1e-3", "ppo.critic_lr=1e-3",
              "rollout.seed_per_prompt=true", "pretrain.block_size=16"]
    variants = {
        # Two epochs of two mini-batches; separate critic (its own DDP module).
        "separate": [],
        # Shared critic, per-mini-batch whitening, KL and entropy in the loss, PTX, reward
        # normalisation over 5 samples (uneven blocks: 3 and 2), an extra reward term, early stop.
        "shared": ["ppo.critic=shared", "ppo.whiten_advantages=minibatch", "ppo.kl_mode=loss",
                   "ppo.kl_estimator=k3", "ppo.ent_coef=0.01", "ppo.ptx_coef=0.5", "ppo.ptx_batch=4",
                   "ppo.reward_norm=true", "ppo.reward_norm_samples=5", "ppo.reward_scaling=true",
                   "ppo.extra_rewards=[{fn: repetition_penalty}]", "ppo.target_kl=1e-8"],
        # A2C: one step per rollout over micro-batches of 2 rows.
        "a2c": ["ppo.algorithm=a2c", "ppo.minibatch=2"],
    }
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
