"""The KV-cache decoding loop and its sampler: same tokens as `generate` where it is deterministic,
the exact sampling distribution, and log-probs the training forward reproduces."""

import math

import pytest
import torch

from rlhfkit.models.loading import tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.rollout.batch import left_pad
from rlhfkit.rollout.decode import decode, sample_categorical
from rlhfkit.rollout.generate import cut_at_eos, generation_config, sample_responses
from rlhfkit.rollout.logprobs import gather_logprobs, response_logprobs
from rlhfkit.train.loop import make_optimizer

TEXTS = [f"1. item {i}\n2. thing {i * 7}\nsome words about lists {i}" for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    lm = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1)
    # Larger weights than the 0.02 init, so greedy outputs differ between prompts and steps.
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in lm.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return lm.eval()


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["1. item", "some words about lists 3 and more", "2.", "thing 14\n2."]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_sample_categorical_draws_the_softmax_distribution():
    logits = torch.tensor([2.0, 0.0, -1.0, float("-inf"), 1.0, float("-inf")])
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    draws = sample_categorical(logits.expand(n, -1), generator=gen)
    counts = torch.bincount(draws, minlength=logits.numel()).double()
    probs = torch.softmax(logits.double(), -1)
    # Impossible tokens (in the middle and at the end of the vocabulary) are never drawn.
    assert counts[3] == 0 and counts[5] == 0
    for k in (0, 1, 2, 4):
        sigma = math.sqrt(n * probs[k] * (1 - probs[k]))
        assert abs(counts[k] - n * probs[k]) < 4 * sigma, (k, counts[k].item(), n * probs[k].item())


def test_sample_categorical_temperature_and_errors():
    # At a low temperature the draw is the argmax; rows are sampled independently.
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(1)
    assert sample_categorical(logits / 0.01, generator=gen).tolist() == [1, 0]
    with pytest.raises(ValueError, match="rows, vocab"):
        sample_categorical(torch.zeros(3))


def test_cut_at_eos_keeps_every_sampled_token():
    # A row ends at its first EOS; after it comes only padding. A pad token sampled before the
    # EOS (pad != EOS) is part of the response: later tokens were conditioned on it.
    assert cut_at_eos([11, 0, 12, 2, 0, 0], eos_id=2) == [11, 0, 12, 2]
    assert cut_at_eos([11, 0, 12], eos_id=2) == [11, 0, 12]  # no EOS within max_new_tokens
    assert cut_at_eos([2, 5], eos_id=2) == [2]


def test_greedy_decode_equals_generate(model, tokenizer):
    prompts = _prompts(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad)
    want = model.generate(
        input_ids=ids, attention_mask=mask, generation_config=generation_config(eos, pad, 12, 0.0)
    )[:, ids.size(1) :]
    got = decode(
        model, ids, mask, lambda logits: logits.argmax(-1), eos_id=eos, pad_id=pad, max_new_tokens=12
    )
    assert [cut_at_eos(r, eos) for r in got.tolist()] == [cut_at_eos(r, eos) for r in want.tolist()]
    assert len({tuple(r) for r in got.tolist()}) > 1  # the prompts really lead to different answers
    # sample_responses at temperature 0 runs the same loop, in any batch size.
    greedy = sample_responses(model, prompts, eos_id=eos, pad_id=pad, max_new_tokens=12, temperature=0.0)
    assert greedy == [cut_at_eos(r, eos) for r in want.tolist()]
    assert (
        sample_responses(
            model, prompts, eos_id=eos, pad_id=pad, max_new_tokens=12, temperature=0.0, batch_size=3
        )
        == greedy
    )


def test_sampled_tokens_have_the_log_probs_the_training_forward_computes(model, tokenizer):
    prompts = _prompts(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad)
    temperature = 0.7
    seen: list[torch.Tensor] = []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.clone())
        return sample_categorical(logits / temperature)

    torch.manual_seed(0)
    new = decode(model, ids, mask, pick, eos_id=eos, pad_id=pad, max_new_tokens=10)
    sampled_logp = gather_logprobs(torch.stack(seen, 1) / temperature, new)
    full = torch.cat([ids, new], 1)
    with torch.no_grad():
        train_logp = response_logprobs(
            model, full, torch.cat([mask, torch.ones_like(new)], 1), new.size(1), temperature
        )
    valid = torch.ones_like(new, dtype=torch.bool)
    for i, row in enumerate(new.tolist()):
        if eos in row:  # after EOS the row holds padding, which nothing reads
            valid[i, row.index(eos) + 1 :] = False
    assert torch.allclose(train_logp[valid], sampled_logp[valid], atol=1e-4)


def test_sample_categorical_frequencies_are_exact_on_a_grid_of_uniforms(monkeypatch):
    # Uniforms at the centres of N equal cells: token k must take round(N * p_k) of them (within
    # one cell at each end of its interval), and impossible tokens, first, inner and last, none.
    logits = torch.tensor([float("-inf"), 2.0, 0.0, -1.0, float("-inf"), 1.0, float("-inf")])
    n = 10_000
    grid = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: grid)
    counts = torch.bincount(sample_categorical(logits.expand(n, -1)), minlength=logits.numel())
    monkeypatch.undo()
    expected = torch.softmax(logits.double(), -1) * n
    assert counts[[0, 4, 6]].tolist() == [0, 0, 0]
    assert (counts.double() - expected).abs().max() <= 1.0, (counts.tolist(), expected.tolist())
    # The ends of [0, 1): u = 0 draws the first possible token, u just below 1 the last one.
    for u, token in ((0.0, 1), (1.0 - 2**-53, 5)):
        monkeypatch.setattr(
            torch, "rand", lambda *args, u=u, **kwargs: torch.tensor([[u]], dtype=torch.float64)
        )
        assert sample_categorical(logits[None]).tolist() == [token]
        monkeypatch.undo()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_decode_positions_under_left_padding(tokenizer, arch):
    """GPT-2's learned absolute positions see a shift that rotary ones (Llama) cannot: the tokens
    sampled after left-padded prompts have the log-probs of the training forward, and each prompt
    alone is decoded as in the batch."""
    lm = tiny_causal_lm(
        tokenizer, arch=arch, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1
    )
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in lm.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    lm.eval()
    prompts = _prompts(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad)
    seen: list[torch.Tensor] = []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.clone())
        return sample_categorical(logits / 0.7, generator=gen)

    new = decode(lm, ids, mask, pick, eos_id=eos, pad_id=pad, max_new_tokens=10)
    sampled_logp = gather_logprobs(torch.stack(seen, 1) / 0.7, new)
    with torch.no_grad():
        train_logp = response_logprobs(
            lm, torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1), new.size(1), 0.7
        )
    valid = torch.ones_like(new, dtype=torch.bool)
    for i, row in enumerate(new.tolist()):
        if eos in row:
            valid[i, row.index(eos) + 1 :] = False
    assert torch.allclose(train_logp[valid], sampled_logp[valid], atol=1e-4)
    kw = {"eos_id": eos, "pad_id": pad, "max_new_tokens": 10, "temperature": 0.0}
    together = sample_responses(lm, prompts, **kw)
    assert [sample_responses(lm, [p], **kw)[0] for p in prompts] == together


def test_min_new_tokens_suppresses_eos_and_the_loop_stops_when_all_rows_ended(model, tokenizer):
    prompts = _prompts(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad)
    other = 7 if eos != 7 else 8

    def eos_when_allowed(logits: torch.Tensor) -> torch.Tensor:
        allowed = torch.isfinite(logits[:, eos])
        return torch.where(allowed, torch.full_like(allowed, eos, dtype=torch.long), other)

    kw = {"eos_id": eos, "pad_id": pad, "max_new_tokens": 10}
    # Every row ends at once: one column, not ten.
    assert decode(model, ids, mask, eos_when_allowed, **kw).tolist() == [[eos]] * len(prompts)
    got = decode(model, ids, mask, eos_when_allowed, min_new_tokens=3, **kw)
    assert got.tolist() == [[other, other, other, eos]] * len(prompts)
    with pytest.raises(ValueError, match="min_new_tokens"):
        decode(model, ids, mask, eos_when_allowed, eos_id=eos, pad_id=pad, max_new_tokens=2, min_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode(model, ids, mask, eos_when_allowed, eos_id=eos, pad_id=pad, max_new_tokens=0)


def test_rows_that_ended_are_padded_while_others_continue(model, tokenizer):
    prompts = _prompts(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad)
    step = {"t": 0}

    def first_row_ends(logits: torch.Tensor) -> torch.Tensor:
        tokens = torch.full((logits.size(0),), 9, dtype=torch.long)
        if step["t"] == 1:
            tokens[0] = eos
        step["t"] += 1
        return tokens

    got = decode(model, ids, mask, first_row_ends, eos_id=eos, pad_id=pad, max_new_tokens=4).tolist()
    assert got[0] == [9, eos, pad, pad] and all(row == [9, 9, 9, 9] for row in got[1:])


def test_fused_optimizer_steps_bump_parameter_versions():
    # Version counters are how the vLLM backend knows the weights changed since its last sync.
    layer = torch.nn.Linear(4, 2)
    optimizer, _ = make_optimizer(layer.parameters(), 1e-2, total_steps=2, warmup_steps=0)
    assert optimizer.defaults["fused"] is True
    before = [p._version for p in layer.parameters()]
    layer(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    assert all(p._version > v for p, v in zip(layer.parameters(), before, strict=True))


def test_optimizer_holds_only_trainable_parameters_and_stays_fused():
    # A frozen part (a LoRA/QLoRA base; a quantized one holds packed integer tensors) stays out.
    trained, frozen = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    frozen.weight = torch.nn.Parameter(torch.zeros(2, 4, dtype=torch.uint8), requires_grad=False)
    frozen.bias.requires_grad_(False)
    optimizer, _ = make_optimizer([*trained.parameters(), *frozen.parameters()], 1e-2, 2, 0)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == 2 and all(any(p is q for q in trained.parameters()) for p in held)
    assert optimizer.defaults["fused"] is True


def test_fused_optimizer_makes_the_plain_adamw_update():
    torch.manual_seed(0)
    fused_layer = torch.nn.Linear(6, 3)
    plain_layer = torch.nn.Linear(6, 3)
    plain_layer.load_state_dict(fused_layer.state_dict())
    fused, _ = make_optimizer(fused_layer.parameters(), 1e-2, total_steps=3, warmup_steps=0, weight_decay=0.1)
    plain = torch.optim.AdamW(plain_layer.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    x = torch.randn(5, 6)
    for _ in range(3):
        for layer, opt in ((fused_layer, fused), (plain_layer, plain)):
            layer(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(fused_layer.parameters(), plain_layer.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
