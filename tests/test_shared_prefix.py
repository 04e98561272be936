"""Chosen and rejected in one row that holds their shared prompt once (rm.share_prompt and
dpo.share_prompt), and the last block's MLP only where the rewards are read (ReadPositions).

The layout is checked by hand on small cases; the rewards and their gradients must equal those of
the two sequences scored separately (two padded rows), under sdpa and eager attention, for each
tiny architecture, through the TokenValues wrapper and LoRA; a model whose attention cannot take
the mask uses two rows; a reward model trained either way (with gradient checkpointing too) ends
with the same losses. A scoring forward builds no KV cache.

GRPO/RLOO's groups (grpo.share_prompt, rloo.share_prompt): the G responses to a prompt in one row
that holds the prompt once; the layout by hand, log-probs and gradients equal to G rows, rows kept
where grouping would more than double the attention, and runs either way with the same losses.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers.integrations import sdpa_attention

from rlhfkit.config import load_config
from rlhfkit.models.heads import (
    READ_ATTENTION,
    ReadPositions,
    TokenValues,
    last_block,
    last_block_mlp,
    pair_scores,
    sequence_scores,
    takes_pair_masks,
    token_values,
)
from rlhfkit.models.loading import load_causal_lm, load_reward_model, save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.rollout.batch import (
    PromptResponseBatch,
    common_prefix_length,
    join_prompt_response,
    right_pad,
    shared_prefix_pairs,
    shared_prompt_groups,
)
from rlhfkit.rollout.logprobs import response_logprobs
from rlhfkit.train import grpo as grpo_module
from rlhfkit.train import rm as rm_module
from rlhfkit.train.dpo import pair_logprobs, run_dpo, sequence_logprobs
from rlhfkit.train.grpo import batch_logprobs
from rlhfkit.train.rm import run_rm, score_pairs

PAD = 0


def test_layout_by_hand() -> None:
    # a = 1 2 3 4, b = 1 2 5: shared "1 2", then a's "3 4", then b's "5" at position 2.
    # Second pair: b is a prefix of a (its last token is in the shared part).
    pairs = shared_prefix_pairs([([1, 2, 3, 4], [1, 2, 5]), ([7, 8, 9], [7, 8])], PAD)
    assert pairs.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, PAD, PAD]]
    assert pairs.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 0, 0]]
    assert pairs.last.tolist() == [[3, 4], [2, 1]]
    first = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # b's "5": the shared part and itself, not a's "3 4"
    ]
    second = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],  # padding: itself only, so no row of the mask is empty
        [0, 0, 0, 0, 1],
    ]
    assert pairs.allowed.shape == (2, 1, 5, 5)
    assert pairs.allowed[:, 0].int().tolist() == [first, second]
    additive = pairs.attention_mask("eager", torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, pairs.allowed)
    assert (additive[~pairs.allowed] == torch.finfo(torch.float32).min).all()
    assert pairs.attention_mask("sdpa", torch.float32) is pairs.allowed


def test_layout_with_leading_padding() -> None:
    # Two leading pad columns, then a = 1 2 3 and b = 1 4; b's "4" sits after a's rest.
    pairs = shared_prefix_pairs([([1, 2, 3], [1, 4]), ([5, 6, 7], [5, 6, 7, 8])], PAD, lead=[2, 0])
    assert pairs.input_ids.tolist() == [[PAD, PAD, 1, 2, 3, 4], [5, 6, 7, 8, PAD, PAD]]
    assert pairs.position_ids.tolist() == [[0, 0, 0, 1, 2, 1], [0, 1, 2, 3, 0, 0]]
    assert pairs.last.tolist() == [[4, 5], [2, 3]]
    assert pairs.allowed[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 1, 0, 0, 1],
    ]
    positions = torch.tensor([[0, 1, 2], [0, 1, 2]])
    assert pairs.columns(0, positions).tolist() == [[2, 3, 4], [0, 1, 2]]
    assert pairs.columns(1, torch.tensor([[0, 1], [2, 3]])).tolist() == [[2, 5], [2, 3]]


def test_layout_edge_cases() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([4], [5]) == 0
    # a is a prefix of b; a and b equal; nothing shared.
    pairs = shared_prefix_pairs([([1, 2], [1, 2, 3]), ([4, 5], [4, 5]), ([6], [7, 8])], PAD)
    assert pairs.input_ids.tolist() == [[1, 2, 3], [4, 5, PAD], [6, 7, 8]]
    assert pairs.position_ids.tolist() == [[0, 1, 2], [0, 1, 0], [0, 0, 1]]
    assert pairs.last.tolist() == [[1, 2], [1, 1], [0, 2]]
    # Nothing shared: b's tokens see only b.
    assert pairs.allowed[2, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    with pytest.raises(ValueError, match="empty"):
        shared_prefix_pairs([([1], [])], PAD)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny causal LMs of each architecture the tiny model comes in, saved to load as reward models."""
    tokenizer = train_tokenizer([f"item {i} and item {i + 1}" for i in range(50)], vocab_size=300)
    dirs = {}
    for arch in ("llama", "qwen2", "gpt2"):
        dirs[arch] = tmp_path_factory.mktemp(arch)
        model = tiny_causal_lm(
            tokenizer, arch, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
        )
        save_model(model, tokenizer, dirs[arch])
    return dirs


@pytest.fixture(scope="module")
def reward_model_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["llama"]


def _random_pairs(seed: int, n: int = 12) -> list[tuple[list[int], list[int]]]:
    """Pairs with prompts of varied length, responses that share a start or not, one response a
    prefix of the other, and equal responses."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 12))]
        a = prompt + [rng.randrange(3, 300) for _ in range(rng.randint(1, 15))]
        b = prompt + [rng.randrange(3, 300) for _ in range(rng.randint(1, 15))]
        if i % 4 == 1:
            b = a[: len(prompt) + 1]
        elif i % 4 == 2:
            b = list(a)
        elif i % 4 == 3:
            b = a[: len(prompt)] + a[len(prompt) : len(prompt) + 2] + b[len(prompt) :]
        pairs.append((a, b))
    return pairs


def _separately(model, pairs) -> torch.Tensor:
    ids, mask = right_pad([a for a, _ in pairs] + [b for _, b in pairs], PAD)
    scores = sequence_scores(model, ids, mask)
    return torch.stack([scores[: len(pairs)], scores[len(pairs) :]], dim=1)


def _bt_grads(model, score) -> list[torch.Tensor]:
    model.zero_grad()
    scores = score()
    (-torch.nn.functional.logsigmoid(scores[:, 0] - scores[:, 1])).mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "arch, attention_kind",
    [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("gpt2", "sdpa"), ("gpt2", "eager")],
)
def test_scores_and_gradients_equal_two_rows(
    model_dirs: dict[str, Path], arch: str, attention_kind: str, monkeypatch
) -> None:
    torch.manual_seed(0)
    model = load_reward_model(model_dirs[arch], PAD)
    model.set_attn_implementation(attention_kind)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a head that is not zero, so the scores differ
    assert takes_pair_masks(model)
    pairs = _random_pairs(0)
    together = shared_prefix_pairs(pairs, PAD)
    assert together.input_ids.numel() < 2 * len(pairs) * max(len(s) for p in pairs for s in p)
    with torch.no_grad():
        expected = _separately(model, pairs)
        got = pair_scores(model, together, torch.device("cpu"))
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Equal responses get equal rewards; so does a response and the same response in the wrapper.
    assert torch.equal(got[2, 0], got[2, 1])
    with torch.no_grad():
        wrapped = pair_scores(TokenValues(model), together, torch.device("cpu"))
    assert torch.equal(wrapped, got)
    # Gradients in eval mode: GPT-2 has dropout, which would make the two forwards different draws.
    grads_two_rows = _bt_grads(model, lambda: _separately(model, pairs))
    grads_one_row = _bt_grads(model, lambda: pair_scores(model, together, torch.device("cpu")))
    assert len(grads_one_row) == len(grads_two_rows) > 0
    for g1, g2 in zip(grads_one_row, grads_two_rows, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)

    # The last block only at the read positions: the same scores and gradients, and its query and
    # output projections, its norm after attention, its MLP, the final norm and (under sdpa) its
    # attention really saw only those positions (each once, though equal responses are read at one
    # token).
    ids, mask = right_pad([a for a, _ in pairs], PAD)
    with torch.no_grad():
        whole = token_values(model, ids, mask)
    block = last_block(model)
    attention = getattr(block, "self_attn", None) or block.attn
    backbone = getattr(model, model.base_model_prefix)
    if arch == "gpt2":  # GPT-2 projects queries, keys and values in one fused c_attn: left whole
        reduced = [attention.c_proj, block.ln_2, block.mlp, backbone.ln_f]
    else:
        reduced = [
            attention.q_proj,
            attention.o_proj,
            block.post_attention_layernorm,
            block.mlp,
            backbone.norm,
        ]
    seen: dict[int, list] = {id(m): [] for m in reduced}
    queries: list = []
    real_sdpa = sdpa_attention.sdpa_attention_forward

    def sdpa_counting(module, query, *args, **kwargs):
        if module is attention:
            queries.append(tuple(query.shape))
        return real_sdpa(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", sdpa_counting)
    with ReadPositions(model) as reads:
        assert reads.active
        assert attention.config._attn_implementation == (
            READ_ATTENTION if attention_kind == "sdpa" else "eager"
        )
        # Registered after the gathering hooks, so they see what the modules compute on.
        counting = [
            m.register_forward_pre_hook(lambda module, args: seen[id(module)].append(tuple(args[0].shape)))
            for m in reduced
        ]
        grads_read = _bt_grads(model, lambda: pair_scores(model, together, torch.device("cpu"), reads))
        with torch.no_grad():
            read = pair_scores(model, together, torch.device("cpu"), reads)
            # A forward of another shape in between runs the block whole.
            assert torch.equal(token_values(model, ids, mask), whole)
    for hook in counting:
        hook.remove()
    torch.testing.assert_close(read, expected, atol=1e-5, rtol=1e-5)
    for g1, g2 in zip(grads_read, grads_two_rows, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    n_read = sum(len(set(columns)) for columns in together.last.tolist())
    assert n_read < 2 * len(pairs)
    for module in reduced:
        assert [shape[:2] for shape in seen[id(module)]] == [(1, n_read), (1, n_read), tuple(ids.shape)]
    if attention_kind == "sdpa":
        # One query of length 1 per read position, then the whole batch for the other shape.
        heads = model.config.num_attention_heads
        assert [(q[0], q[2]) for q in queries] == [(n_read, 1), (n_read, 1), (len(pairs), ids.size(1))]
        assert all(q[1] == heads for q in queries)
    # Left whole afterwards: the hooks and the config copy are gone and every position's value is
    # right again.
    assert attention.config is model.config
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in reduced)
    with torch.no_grad():
        assert torch.equal(token_values(model, ids, mask), whole)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_scoring_builds_no_kv_cache(model_dirs: dict[str, Path], arch: str) -> None:
    # The configs ask for a cache (use_cache: true, as saved checkpoints usually do); a scoring
    # forward must not build one: nothing decodes after it.
    model = load_reward_model(model_dirs[arch], PAD)
    assert model.config.use_cache
    backbone = getattr(model, model.base_model_prefix)
    caches = []
    hook = backbone.register_forward_hook(lambda module, args, out: caches.append(out.past_key_values))
    ids, mask = right_pad([[1, 2, 3], [4, 5]], PAD)
    token_values(model, ids, mask)
    pair_scores(model, shared_prefix_pairs(_random_pairs(3, n=2), PAD), torch.device("cpu"))
    hook.remove()
    assert caches == [None, None]


def test_lora_model_scores_equal(reward_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_reward_model(reward_model_dir, PAD)
    model = get_peft_model(
        model,
        LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"], init_lora_weights=False
        ),
    )
    assert takes_pair_masks(model)
    pairs = _random_pairs(1)
    with torch.no_grad():
        expected = _separately(model, pairs)
        got = pair_scores(model, shared_prefix_pairs(pairs, PAD), torch.device("cpu"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_other_attention_kernels_use_two_rows(reward_model_dir: Path, monkeypatch) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # A kernel under another name (as flash-attention or a user's own would be): the pair layout
    # cannot know it applies a ready-made mask. Not flex_attention itself: on the CPU it compiles
    # kernels whose output held a NaN in about one process of three (torch's, not ours).
    AttentionInterface.register("unknown_to_rlhfkit", sdpa_attention_forward)
    model = load_reward_model(reward_model_dir, PAD)
    model.set_attn_implementation("unknown_to_rlhfkit")
    assert not takes_pair_masks(model)

    def refuse(*args, **kwargs):
        raise AssertionError("pair_scores called for a model that cannot take the mask")

    monkeypatch.setattr(rm_module, "pair_scores", refuse)
    pairs = _random_pairs(2, n=4)
    with torch.no_grad():
        chosen, rejected = score_pairs(model, pairs, PAD, torch.device("cpu"))
        model.set_attn_implementation("sdpa")
        expected = _separately(model, pairs)
    torch.testing.assert_close(torch.stack([chosen, rejected], 1), expected, atol=1e-5, rtol=1e-5)


def _text_pairs(seed: int, n: int) -> list[dict]:
    """{prompt, chosen, rejected} pairs of random words, as the stages read them."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "item", "and"]

    def answer() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))

    return [
        {"prompt": f"Question {i}: name some things.", "chosen": answer(), "rejected": answer()}
        for i in range(n)
    ]


def _dpo_examples(seed: int, n: int = 10) -> tuple[list, list]:
    """(prompt, response) examples of chosen and rejected: prompts of varied length, responses
    that share a start or not, one a prefix of the other, equal ones."""
    rng = random.Random(seed)
    chosen, rejected = [], []
    for i in range(n):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 12))]
        a = [rng.randrange(3, 300) for _ in range(rng.randint(1, 15))]
        b = [rng.randrange(3, 300) for _ in range(rng.randint(1, 15))]
        if i % 4 == 1:
            b = a[:1]
        elif i % 4 == 2:
            b = list(a)
        elif i % 4 == 3:
            b = a[:2] + b
        chosen.append((prompt, a))
        rejected.append((prompt, b))
    return chosen, rejected


@pytest.mark.parametrize("arch, attention", [("llama", "sdpa"), ("qwen2", "eager"), ("gpt2", "sdpa")])
@pytest.mark.parametrize("average", [False, True])
def test_dpo_logprobs_and_gradients_equal_two_rows(
    model_dirs: dict[str, Path], arch: str, attention: str, average: bool
) -> None:
    policy = load_causal_lm(model_dirs[arch])
    policy.set_attn_implementation(attention)
    policy.eval()  # GPT-2's dropout would make the two forwards different draws
    chosen, rejected = _dpo_examples(0)
    cpu = torch.device("cpu")

    def two_rows():
        logp = sequence_logprobs(policy, chosen + rejected, PAD, cpu, average)
        return logp[: len(chosen)], logp[len(chosen) :]

    def one_row():
        return pair_logprobs(policy, chosen, rejected, PAD, cpu, average)

    grads = []
    for compute in (two_rows, one_row):
        policy.zero_grad()
        c, r = compute()
        (c - 0.5 * r).sum().backward()
        grads.append(
            ([c.detach(), r.detach()], [p.grad.clone() for p in policy.parameters() if p.grad is not None])
        )
    (expected, expected_grads), (got, got_grads) = grads
    assert expected[0].abs().min() > 1.0  # real log-probs, not zeros
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)
    assert torch.equal(got[0][2], got[1][2])  # equal responses: equal log-probs
    assert len(got_grads) == len(expected_grads) > 0
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_dpo_pairs_need_one_prompt(model_dirs: dict[str, Path]) -> None:
    policy = load_causal_lm(model_dirs["llama"])
    with pytest.raises(ValueError, match="different prompts"):
        pair_logprobs(policy, [([5, 6], [7])], [([5], [7])], PAD, torch.device("cpu"))


@pytest.mark.parametrize("precompute", [True, False])
def test_dpo_trained_either_way_gives_the_same_losses(
    reward_model_dir: Path, tmp_path: Path, precompute: bool
) -> None:
    pairs = _text_pairs(1, 16)
    losses = {}
    for share in (True, False):
        config = load_config(
            overrides=[
                f"dpo.share_prompt={str(share).lower()}",
                f"dpo.precompute_reference={str(precompute).lower()}",
                "dpo.epochs=3",
                "dpo.batch_size=8",
            ]
        )
        out = tmp_path / str(share)
        run_dpo(config, reward_model_dir, pairs, out, False)
        losses[share] = [
            json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
        ]
    assert len(losses[True]) == 6
    assert losses[True][-1] < losses[True][0]  # it learns
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


def test_model_without_a_block_mlp_is_left_whole() -> None:
    plain = torch.nn.Linear(4, 1)
    assert last_block_mlp(plain) is None
    with ReadPositions(plain) as reads:
        assert not reads.active


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_either_way_gives_the_same_losses(
    reward_model_dir: Path, tmp_path: Path, checkpointing: bool
) -> None:
    pairs = _text_pairs(0, 24)
    pairs[3]["rejected"] = pairs[3]["chosen"]  # equal responses: one read position
    losses = {}
    for share in (True, False):
        config = load_config(
            overrides=[
                f"rm.share_prompt={str(share).lower()}",
                f"model.gradient_checkpointing={str(checkpointing).lower()}",
                "rm.epochs=3",
                "rm.batch_size=8",
            ]
        )
        out = tmp_path / str(share)
        summary = run_rm(config, reward_model_dir, pairs, out, False)
        losses[share] = [
            json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
        ]
        assert summary["steps"] == len(losses[share]) == 9
    assert losses[True][-1] < losses[True][0]  # it learns
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


# ---- GRPO/RLOO: the responses to one prompt in one row ------------------------------------------


def test_group_layout_by_hand() -> None:
    # Rows 0 and 2 share the prompt "5 6"; row 1 has its own, "7". Responses: "1 2", "3", "4 9 8".
    batch = join_prompt_response([[5, 6], [7], [5, 6]], [[1, 2], [3], [4, 9, 8]], PAD)
    layout = shared_prompt_groups(batch)
    assert layout.group.tolist() == [0, 1, 0] and layout.slot.tolist() == [0, 0, 1]
    # The prompt's two columns, then two slots of three columns (the longest response).
    assert layout.input_ids.tolist() == [[5, 6, 1, 2, PAD, 4, 9, 8], [PAD, 7, 3, PAD, PAD, PAD, PAD, PAD]]
    real = [[1, 1, 1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0]]
    positions = [[0, 1, 2, 3, None, 2, 3, 4], [None, 0, 1, None, None, None, None, None]]
    for row, flags, expected in zip(layout.position_ids.tolist(), real, positions, strict=True):
        assert [p for p, f in zip(row, flags, strict=True) if f] == [p for p in expected if p is not None]
    assert layout.allowed.shape == (2, 1, 8, 8)
    assert layout.allowed[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],  # response padding: itself only
        [1, 1, 0, 0, 0, 1, 0, 0],  # the second response: the prompt and itself, not the first
        [1, 1, 0, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 1, 1, 1],
    ]
    assert layout.allowed[1, 0, 2].int().tolist() == [0, 1, 1, 0, 0, 0, 0, 0]  # not the pad column


def test_group_layout_needs_a_prompt() -> None:
    batch = join_prompt_response([[5, 6], []], [[1], [2]], PAD)
    with pytest.raises(ValueError, match="needs a prompt"):
        shared_prompt_groups(batch)


@pytest.fixture
def built_layouts(monkeypatch) -> list:
    """Every `SharedPromptGroups` the GRPO/RLOO log-probs build while the test runs."""
    built = []
    lay_out = grpo_module.shared_prompt_groups

    def spy(*args):
        built.append(lay_out(*args))
        return built[-1]

    monkeypatch.setattr(grpo_module, "shared_prompt_groups", spy)
    return built


def test_groups_only_where_attention_at_most_doubles(reward_model_dir: Path, built_layouts: list) -> None:
    policy = load_causal_lm(reward_model_dir)
    # One-token prompt, four responses of 20: 4 rows of 21 (1,764 scores) against one row of 81
    # (6,561 > twice 1,764): the rows are kept.
    long = join_prompt_response([[5]] * 4, [list(range(3, 23))] * 4, PAD)
    with torch.no_grad():
        batch_logprobs(policy, long)
    assert built_layouts == []
    # A row without a prompt: rows, as before (the layout itself refuses it).
    no_prompt = join_prompt_response([[5, 6], [], [5, 6]], [[1], [2], [3]], PAD)
    with torch.no_grad():
        torch.testing.assert_close(
            batch_logprobs(policy, no_prompt),
            response_logprobs(policy, no_prompt.input_ids, no_prompt.attention_mask, 1),
        )
    assert built_layouts == []
    # Eight-token prompt, four responses of 4: 4 rows of 12 (576) against one of 24 (576).
    short = join_prompt_response([list(range(3, 11))] * 4, [[11, 12, 13, 14]] * 4, PAD)
    with torch.no_grad():
        batch_logprobs(policy, short)
    assert len(built_layouts) == 1


def _random_groups(seed: int) -> PromptResponseBatch:
    """Three prompts of different lengths, with 3, 1 and 2 responses, rows interleaved; responses
    of 1 to 6 tokens (right padding), one empty."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (4, 7, 2)]
    order = [0, 1, 0, 2, 0, 2]
    responses = [[rng.randrange(3, 300) for _ in range(rng.randint(1, 6))] for _ in order]
    responses[3] = []
    return join_prompt_response([prompts[i] for i in order], responses, PAD)


@pytest.mark.parametrize(
    "arch, attention, temperature", [("llama", "sdpa", 1.0), ("qwen2", "eager", 0.7), ("gpt2", "sdpa", 0.7)]
)
def test_group_logprobs_and_gradients_equal_rows(
    model_dirs: dict[str, Path], arch: str, attention: str, temperature: float
) -> None:
    torch.manual_seed(0)
    policy = load_causal_lm(model_dirs[arch]).eval()  # eval: GPT-2's dropout would draw differently
    policy.set_attn_implementation(attention)
    batch = _random_groups(0)
    mask = batch.response_mask.bool()
    assert shared_prompt_groups(batch).input_ids.numel() < batch.input_ids.numel()

    def grads(share: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        policy.zero_grad()
        logp = batch_logprobs(policy, batch, temperature, share)
        (logp * mask).sum().backward()
        return logp.detach(), [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    rows, rows_grads = grads(False)
    grouped, grouped_grads = grads(True)
    torch.testing.assert_close(
        rows, response_logprobs(policy, batch.input_ids, batch.attention_mask, batch.n_response, temperature)
    )
    torch.testing.assert_close(grouped[mask], rows[mask], atol=1e-5, rtol=1e-5)
    assert len(grouped_grads) == len(rows_grads) > 0
    for g1, g2 in zip(grouped_grads, rows_grads, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "section, extra", [("grpo", ["grpo.update_epochs=2", "grpo.minibatch=4"]), ("rloo", ["rloo.minibatch=8"])]
)
def test_critic_free_trained_either_way_gives_the_same_losses(
    reward_model_dir: Path, tmp_path: Path, built_layouts: list, section: str, extra: list[str]
) -> None:
    from rlhfkit.train.grpo import run_critic_free
    from rlhfkit.train.rewards import RewardTerm

    def item_count(prompts, completions, **kwargs):
        return [float(c.count("item")) for c in completions]

    prompts = [f"item {i} and" for i in range(6)]
    losses = {}
    for share in (True, False):
        config = load_config(
            overrides=[
                *extra,
                f"{section}.share_prompt={str(share).lower()}",
                f"{section}.steps=3",
                f"{section}.prompts_per_step=2",
                f"{section}.group_size=4",
                f"{section}.max_new_tokens=6",
            ]
        )
        out = tmp_path / str(share)
        terms = [RewardTerm("items", 1.0, item_count)]
        run_critic_free(config, section, reward_model_dir, terms, prompts, out, show_progress=False)
        losses[share] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if share:  # the shared rows were used: fewer rows than responses
            assert any(len(set(layout.group.tolist())) < len(layout.group) for layout in built_layouts)
    assert len(losses[True]) == 3
    assert any(row["loss"] != 0 for row in losses[True])
    for shared, rows in zip(losses[True], losses[False], strict=True):
        assert shared["reward/total"] == rows["reward/total"]  # the same samples
        assert shared["loss"] == pytest.approx(rows["loss"], rel=1e-4, abs=1e-6)
        assert shared["kl"] == pytest.approx(rows["kl"], rel=1e-4, abs=1e-6)
