"""Work splitting over processes (train/distributed.py) and per-prompt seeded sampling (rollout/seeded.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhfkit.models.loading import tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.rollout.generate import sample_responses
from rlhfkit.rollout.seeded import PerRowGumbel, prompt_seeds
from rlhfkit.train.distributed import (
    any_process,
    gather_lists,
    gather_rows,
    load_optimizer_state,
    mean_over_processes,
    optimizer_state,
    pretrained_weights,
    refuse_unsupported_sharding,
    require_divisible,
    shard,
    weights_are_sharded,
    whole_state_dict,
    whole_weights,
)


@pytest.mark.parametrize(("n", "n_proc"), [(8, 2), (5, 2), (7, 3), (2, 4), (0, 3), (9, 1)])
def test_shards_are_contiguous_blocks_that_cover_the_batch_in_rank_order(n, n_proc):
    blocks = [list(range(n))[shard(n, r, n_proc)] for r in range(n_proc)]
    assert [i for block in blocks for i in block] == list(range(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_known_blocks_and_bad_input():
    assert [shard(5, r, 2) for r in range(2)] == [slice(0, 3), slice(3, 5)]
    assert [shard(8, r, 4) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match="rank 2 is not a process of 2"):
        shard(4, 2, 2)
    with pytest.raises(ValueError, match="n must be >= 0"):
        shard(-1, 0, 1)
    with pytest.raises(ValueError, match="ppo.minibatch 6 is not divisible by the 4 processes"):
        require_divisible("ppo.minibatch", 6, 4)
    require_divisible("ppo.minibatch", 8, 4)


def test_one_process_helpers_are_the_identity():
    acc = SimpleNamespace(num_processes=1)
    items, t = [[1, 2], [3]], torch.randn(3, 2)
    assert gather_lists(acc, items) is items
    assert gather_rows(acc, t, None)[0] is t and gather_rows(acc, t, None)[1] is None
    stats = {"b": 0.1 + 0.2, "a": 1e-9}
    assert mean_over_processes(acc, stats) is stats
    assert any_process(acc, True) is True and any_process(acc, False) is False


def test_without_sharded_weights_the_state_helpers_are_the_modules_own():
    """One process or DDP: no gathering; whole_weights changes nothing, states are the modules' own."""
    from accelerate.utils import DistributedType

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, unwrap_model=lambda m: m)
    before = [p.detach().clone() for p in model.parameters()]
    with whole_weights(model):
        assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert whole_state_dict(acc, model, "1").keys() == {"weight", "bias"}
    assert torch.equal(whole_state_dict(acc, model)["0.weight"], model[0].weight)
    assert pretrained_weights(acc, model) is None
    state = optimizer_state(acc, model, optimizer)
    assert state.keys() == {"state", "param_groups"} and len(state["state"]) == 4
    fresh = torch.optim.AdamW(model.parameters())
    load_optimizer_state(acc, model, fresh, state)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


def test_sharded_weights_are_fsdp_and_zero3_and_the_rl_stages_refuse_fsdp1_and_sharded_lora():
    from accelerate.utils import DistributedType

    def deepspeed(stage: int) -> SimpleNamespace:
        plugin = SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(
            distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)
        )

    launches = {
        "fsdp2": SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True),
        "fsdp1": SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False),
        "zero3": deepspeed(3),
        "zero2": deepspeed(2),
        "ddp": SimpleNamespace(distributed_type=DistributedType.MULTI_CPU),
        "one": SimpleNamespace(distributed_type=DistributedType.NO),
    }
    assert {name for name, acc in launches.items() if weights_are_sharded(acc)} == {"fsdp2", "fsdp1", "zero3"}
    with pytest.raises(ValueError, match=r"ppo runs under FSDP2 only \(fsdp_version: 2"):
        refuse_unsupported_sharding(launches["fsdp1"], "ppo")
    lora_refused = r"rloo with lora.enabled does not run on sharded weights .*ddp.yaml"
    for name in ("fsdp2", "zero3"):
        with pytest.raises(ValueError, match=lora_refused):
            refuse_unsupported_sharding(launches[name], "rloo", lora=True)
    for name in ("fsdp2", "zero3", "zero2", "ddp", "one"):
        refuse_unsupported_sharding(launches[name], "ppo")
    for name in ("zero2", "ddp", "one"):
        refuse_unsupported_sharding(launches[name], "ppo", lora=True)


def test_prompt_seeds_depend_on_run_step_and_position_only():
    seeds = prompt_seeds(0, 3, 8)
    assert len(set(seeds)) == 8
    assert prompt_seeds(0, 3, 4) == seeds[:4]  # a position's seed does not depend on the batch size
    assert set(prompt_seeds(0, 4, 8)).isdisjoint(seeds)
    assert set(prompt_seeds(1, 3, 8)).isdisjoint(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="n must be >= 0"):
        prompt_seeds(0, 1, -1)


def test_gumbel_max_samples_the_tempered_softmax():
    """argmax(logits / T + Gumbel) over many seeded rows has the frequencies of softmax(logits / T)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    temperature, n = 0.7, 20000
    processor = PerRowGumbel(prompt_seeds(5, 1, n), temperature)
    picks = processor(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / n
    expected = torch.softmax(logits / temperature, -1)
    # Binomial standard error is at most 0.0036 at n = 20000: 0.015 is over 4 of them.
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)
    # A token masked to -inf (EOS before min_new_tokens) is never picked.
    masked = logits.clone()
    masked[0] = float("-inf")
    picks = PerRowGumbel(prompt_seeds(5, 1, 500), temperature)(None, masked.expand(500, -1).clone()).argmax(
        -1
    )
    assert not (picks == 0).any()


def test_gumbel_noise_of_a_row_does_not_depend_on_its_batch():
    scores = torch.randn(4, 10)
    seeds = prompt_seeds(0, 1, 4)
    together = PerRowGumbel(seeds, 1.0)(None, scores)
    alone = torch.cat([PerRowGumbel([s], 1.0)(None, scores[i : i + 1]) for i, s in enumerate(seeds)])
    assert torch.equal(together, alone)
    with pytest.raises(ValueError, match="2 seeds for a batch of 4 rows"):
        PerRowGumbel(seeds[:2], 1.0)(None, scores)
    with pytest.raises(ValueError, match="temperature > 0"):
        PerRowGumbel(seeds, 0.0)


def test_seeded_sampling_is_independent_of_batching_and_order():
    tokenizer = train_tokenizer(["Say a colour number 3. red", "blue green red yellow"] * 40, vocab_size=300)
    torch.manual_seed(0)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    prompts = [tokenizer(f"Say a colour number {i}.")["input_ids"][: 3 + i % 4] for i in range(6)]
    seeds = prompt_seeds(0, 1, 6)
    kw = {"eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id, "max_new_tokens": 8}
    whole = sample_responses(model, prompts, batch_size=6, seeds=seeds, **kw)
    assert sample_responses(model, prompts, batch_size=2, seeds=seeds, **kw) == whole
    reversed_order = sample_responses(model, prompts[::-1], batch_size=4, seeds=seeds[::-1], **kw)
    assert reversed_order[::-1] == whole
    # The global RNG plays no part; other seeds give other samples.
    torch.manual_seed(123)
    assert sample_responses(model, prompts, batch_size=6, seeds=seeds, **kw) == whole
    assert sample_responses(model, prompts, batch_size=6, seeds=prompt_seeds(0, 2, 6), **kw) != whole
    # EOS suppressed until min_new_tokens still holds.
    fixed = sample_responses(model, prompts, seeds=seeds, min_new_tokens=8, **kw)
    assert all(len(r) == 8 and tokenizer.eos_token_id not in r for r in fixed)
    with pytest.raises(ValueError, match="5 seeds for 6 prompts"):
        sample_responses(model, prompts, seeds=seeds[:5], **kw)


def test_a_process_in_a_process_group_leaves_it_at_exit(tmp_path):
    """Left to interpreter shutdown, Gloo can abort a process whose work is done (SIGABRT); the first
    accelerator of a process in a group arranges to destroy the group while Python is still whole."""
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text(
        "import atexit, torch.distributed as dist\n"
        "from rlhfkit.train.loop import make_accelerator\n"
        f"rendezvous = 'file://{tmp_path / 'rendezvous'}'\n"
        "dist.init_process_group('gloo', init_method=rendezvous, rank=0, world_size=1)\n"
        "before = atexit._ncallbacks()\n"
        "make_accelerator(0)\n"
        "make_accelerator(1)  # a second stage in the same process\n"
        "assert atexit._ncallbacks() == before + 1 and dist.is_initialized()\n"
        "atexit._run_exitfuncs()\n"
        "print('initialized after exit handlers:', dist.is_initialized())\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "initialized after exit handlers: False" in done.stdout
