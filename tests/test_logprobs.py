"""Log-probs are invariant to padding and batch size, and match what generation sampled from."""

import pytest
import torch

from rlhfkit.models.heads import sequence_scores
from rlhfkit.models.loading import tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.rollout.batch import join_prompt_response, left_pad
from rlhfkit.rollout.generate import generation_config
from rlhfkit.rollout.logprobs import response_logprobs

TEXTS = [f"1. item {i}\n2. thing {i * 7}\nsome words about lists {i}" for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64).eval()


def _seqs(tokenizer):
    prompts = [
        tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in ["1. item", "some words about lists 3 and more", "2."]
    ]
    responses = [
        tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in [" 4\n2. thing", " 12", " thing 5\nsome words"]
    ]
    return prompts, responses


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def arch_model(request, tokenizer):
    """Llama (rotary positions) and GPT-2 (learned absolute positions: left padding shifts them
    unless the positions are counted from the mask)."""
    return tiny_causal_lm(
        tokenizer, arch=request.param, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    ).eval()


@torch.no_grad()
def test_logprobs_invariant_to_padding_and_batch(arch_model, tokenizer):
    model = arch_model
    prompts, responses = _seqs(tokenizer)
    pad = tokenizer.pad_token_id
    batch = join_prompt_response(prompts, responses, pad)
    together = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.n_response, 0.7)
    for i in range(len(prompts)):
        alone = join_prompt_response([prompts[i]], [responses[i]], pad)
        lp = response_logprobs(model, alone.input_ids, alone.attention_mask, alone.n_response, 0.7)
        n = len(responses[i])
        assert torch.allclose(lp[0, :n], together[i, :n], atol=1e-4)
    # Extra left padding on one row (a longer prompt elsewhere in the batch) changes nothing.
    longer = join_prompt_response(prompts + [[5] * 20], responses + [[6]], pad)
    lp_long = response_logprobs(model, longer.input_ids, longer.attention_mask, longer.n_response, 0.7)
    for i, r in enumerate(responses):
        assert torch.allclose(lp_long[i, : len(r)], together[i, : len(r)], atol=1e-4)


@torch.no_grad()
def test_training_forward_matches_generation_logprobs(model, tokenizer):
    prompts, _ = _seqs(tokenizer)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, mask = left_pad(prompts, pad)
    temperature = 0.7
    config = generation_config(eos, pad, max_new_tokens=8, temperature=temperature)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=config,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, ids.size(1) :]
    # Scores after the temperature warper: the distribution each token was drawn from.
    gen_logp = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1)
    gen_logp = gen_logp.gather(2, new.unsqueeze(-1)).squeeze(-1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    train_logp = response_logprobs(model, out.sequences, full_mask, new.size(1), temperature)
    # Compare only up to each row's first EOS (after it generate emits padding).
    valid = torch.ones_like(new, dtype=torch.bool)
    for i, row in enumerate(new.tolist()):
        if eos in row:
            valid[i, row.index(eos) + 1 :] = False
    assert torch.allclose(train_logp[valid], gen_logp[valid], atol=1e-4)


@torch.no_grad()
def test_sequence_scores_invariant_to_padding_side(tokenizer):
    from transformers import AutoModelForSequenceClassification

    lm = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    config = lm.config
    config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    prompts, responses = _seqs(tokenizer)
    batch = join_prompt_response(prompts, responses, tokenizer.pad_token_id)
    scores = sequence_scores(rm, batch.input_ids, batch.attention_mask)
    for i in range(len(prompts)):
        alone = torch.tensor([prompts[i] + responses[i]])
        s = sequence_scores(rm, alone, torch.ones_like(alone))
        assert s.item() == pytest.approx(scores[i].item(), abs=1e-4)
