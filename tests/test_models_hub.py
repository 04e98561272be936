"""Local 'hub' checkpoints (random-init Llama, Qwen2, GPT-2) through SFT, RM and PPO.

GPT-2's tokenizer has no pad token and no chat template, as on the hub: the pad becomes EOS
and the masks, not the token ids, say what is padding.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedTokenizerFast,
)

from rlhfkit.config import load_config
from rlhfkit.models.loading import (
    learned_position_table,
    load_tokenizer,
    position_table,
    save_model,
    tiny_causal_lm,
)
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.train.ppo import _ptx_blocks, run_ppo
from rlhfkit.train.rm import run_rm
from rlhfkit.train.sft import run_sft, tokenize_demonstrations

TEXTS = ["Say a colour number 3. red", "blue green red yellow", "a colour is red or blue"] * 40
PROMPTS = [f"Say a colour number {i}." for i in range(8)]
DEMOS = [{"prompt": p, "completion": "red"} for p in PROMPTS]
PAIRS = [{"prompt": p, "chosen": "red", "rejected": "blue green"} for p in PROMPTS]
SMALL = [
    "sft.batch_size=4",
    "sft.epochs=0.5",
    "rm.batch_size=4",
    "rm.epochs=0.5",
    "rm.val_share=0",
    "ppo.steps=1",
    "ppo.rollout_batch=4",
    "ppo.minibatch=2",
    "ppo.ppo_epochs=1",
    "ppo.max_new_tokens=5",
    "ppo.reward_norm_samples=4",
]


def byte_level_bpe(special_tokens: list[str]) -> Tokenizer:
    """A 300-token byte-level BPE trained on TEXTS, with these special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def gpt2_style_tokenizer() -> GPT2TokenizerFast:
    """A byte-level BPE with GPT-2's single special token: no pad, no chat template."""
    tok = byte_level_bpe(["<|endoftext|>"])
    return GPT2TokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen2_style_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE shaped like Qwen2's: no BOS token at all, EOS <|im_end|>, a ChatML template."""
    tok = byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    wrapped.chat_template = QWEN_TEMPLATE
    return wrapped


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def hub_folder(request, tmp_path_factory) -> Path:
    """A random-init checkpoint of one architecture saved the way the hub serves it."""
    arch = request.param
    folder = tmp_path_factory.mktemp("hub") / f"tiny-{arch}"
    tokenizer = gpt2_style_tokenizer() if arch == "gpt2" else train_tokenizer(TEXTS, vocab_size=300)
    model = tiny_causal_lm(
        tokenizer,
        arch=arch,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_positions=64,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _generates(folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("Say a colour", return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert out.shape[1] > ids.shape[1]


def test_sft_rm_ppo_on_a_local_checkpoint(hub_folder, tmp_path):
    config = load_config(overrides=SMALL)
    assert AutoTokenizer.from_pretrained(hub_folder).pad_token is None or "gpt2" not in hub_folder.name

    sft = run_sft(config, hub_folder, DEMOS, tmp_path / "sft", show_progress=False)
    assert sft["steps"] == 1 and sft["final_loss"] > 0
    _generates(tmp_path / "sft" / "model")

    rm = run_rm(config, tmp_path / "sft" / "model", PAIRS, tmp_path / "rm", show_progress=False)
    assert rm["n_train_pairs"] == len(PAIRS)
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert reward.config.num_labels == 1 and reward.config.pad_token_id is not None

    ppo = run_ppo(
        config, tmp_path / "sft" / "model", tmp_path / "rm" / "model", PROMPTS, tmp_path / "ppo", False
    )
    assert torch.isfinite(torch.tensor(ppo["final_score"]))
    _generates(tmp_path / "ppo" / "model")
    _generates(tmp_path / "ppo" / "checkpoints" / "step-1")


def test_gpt2_pad_is_eos_and_the_loss_still_covers_eos():
    tokenizer = gpt2_style_tokenizer()
    assert tokenizer.pad_token is None and not tokenizer.chat_template
    from rlhfkit.models.tokenizer import ensure_pad_token

    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    [(ids, loss_mask)] = tokenize_demonstrations(tokenizer, [{"prompt": "Say", "completion": "red"}], 64)
    # The completion's closing EOS (== pad id) is a target the model must learn to emit.
    assert ids[-1] == tokenizer.eos_token_id and loss_mask[-1] == 1
    # Plain-text prompt (no chat template): the prompt tokens carry no loss.
    n_prompt = len(tokenizer("Say\n")["input_ids"])
    assert loss_mask[:n_prompt] == [0] * n_prompt and sum(loss_mask) == len(ids) - n_prompt


def test_load_tokenizer_gives_gpt2_a_pad(tmp_path):
    gpt2_style_tokenizer().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == "<|endoftext|>"


def test_saved_model_round_trips_with_its_chat_template(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    save_model(model, tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == tokenizer.chat_template
    text = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|assistant|>\n")


def test_ptx_documents_of_a_tokenizer_without_bos(tmp_path):
    # Qwen2's tokenizer has no BOS: PTX documents are the text and EOS, not a TypeError on None + str.
    qwen2_style_tokenizer().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.bos_token is None
    blocks = _ptx_blocks(tokenizer, ["red blue", "green"], block_size=2)
    text = tokenizer(["red blue", "green"], add_special_tokens=False)["input_ids"]
    flat = text[0] + [tokenizer.eos_token_id] + text[1] + [tokenizer.eos_token_id]
    assert blocks.flatten().tolist() == flat[: len(flat) // 2 * 2]
    # A tokenizer with a BOS gets it before each document, as pretraining packs them.
    gpt2 = gpt2_style_tokenizer()
    [doc] = _ptx_blocks(gpt2, ["red"], block_size=len(gpt2("red")["input_ids"]) + 2).tolist()
    assert doc == [gpt2.bos_token_id, *gpt2("red")["input_ids"], gpt2.eos_token_id]


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma_style_tokenizer() -> PreTrainedTokenizerFast:
    """Shaped like Gemma's: EOS <eos>, but the chat template ends a turn with <end_of_turn>."""
    tok = byte_level_bpe(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    wrapped.chat_template = GEMMA_TEMPLATE
    return wrapped


def chatml_base_tokenizer() -> PreTrainedTokenizerFast:
    """Shaped like a Qwen2.5 base model's: the ChatML template, but EOS <|endoftext|>."""
    tokenizer = qwen2_style_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    return tokenizer


@pytest.mark.parametrize(
    "make, turn_end",
    [
        (gemma_style_tokenizer, "<end_of_turn>"),
        (chatml_base_tokenizer, "<|im_end|>"),
        (qwen2_style_tokenizer, None),
    ],
)
def test_demonstrations_end_the_way_the_chat_template_ends_a_turn(tmp_path, make, turn_end):
    original = make()
    original.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    [(ids, loss_mask)] = tokenize_demonstrations(tokenizer, [{"prompt": "Say", "completion": "red"}], 64)
    messages = [{"role": "user", "content": "Say"}, {"role": "assistant", "content": "red"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    whole = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # The demonstration is the template's own conversation (up to its last newline), and it ends
    # with the token sampling stops at, so the model learns to end its turn the template's way.
    assert ids == whole[: len(ids)] and tokenizer.decode(whole[len(ids) :]) == "\n"
    assert ids[-1] == tokenizer.eos_token_id and loss_mask[-1] == 1
    assert tokenizer.eos_token == (turn_end or original.eos_token)


def test_a_saved_model_generates_until_the_chat_templates_turn_end(tmp_path):
    """Plain `generate` from a saved folder stops where rlhfkit's sampling stops: at the turn end
    that became the EOS, besides the checkpoint's own EOS."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    gemma_style_tokenizer().save_pretrained(tmp_path / "base")
    tokenizer = load_tokenizer(tmp_path / "base")
    original_eos = tokenizer.convert_tokens_to_ids("<eos>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        eos_token_id=original_eos,
    )
    model = LlamaForCausalLM(config)
    save_model(model, tokenizer, tmp_path / "out")
    stops = GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id
    assert stops == [original_eos, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    # Saving again adds nothing.
    save_model(model, tokenizer, tmp_path / "again")
    assert GenerationConfig.from_pretrained(tmp_path / "again").eos_token_id == stops


# Far more than 32 tokens under a 300-token BPE.
LONG = "red blue green yellow, a colour is red or blue; say a colour number 3. " * 3


def tiny_checkpoint(folder: Path, arch: str, positions: int = 32) -> Path:
    """A one-layer random-init model of `arch` with `positions` positions, saved with a chat tokenizer."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    model = tiny_causal_lm(
        tokenizer,
        arch=arch,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_positions=positions,
    )
    save_model(model, tokenizer, folder)
    return folder


def test_position_table_is_read_off_the_models_structure(tmp_path):
    from transformers import GPTNeoConfig, OPTConfig

    gpt2 = position_table(tiny_checkpoint(tmp_path / "gpt2", "gpt2"))
    assert gpt2 is not None
    assert (gpt2.positions, gpt2.model_type, gpt2.config_key) == (32, "gpt2", "n_positions")
    # OPT's table keeps 2 spare rows (its offset): the limit is the config's count, not the rows.
    opt = OPTConfig(
        vocab_size=300,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=64,
        max_position_embeddings=32,
    )
    neo = GPTNeoConfig(
        vocab_size=300,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        attention_types=[[["global"], 1]],
        max_position_embeddings=48,
    )
    for config, positions in ((opt, 32), (neo, 48)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        table = learned_position_table(model, config.model_type)
        assert table is not None
        assert (table.positions, table.config_key) == (positions, "max_position_embeddings")
    # RoPE computes positions: no table, so no limit to check.
    for arch in ("llama", "qwen2"):
        assert position_table(tiny_checkpoint(tmp_path / arch, arch)) is None


def test_position_table_of_a_rotary_config_builds_no_model(tmp_path, monkeypatch):
    """Rotary models are answered from their config: no meta model is built at every stage start."""
    import rlhfkit.models.loading as loading

    llama, gpt2 = tiny_checkpoint(tmp_path / "llama", "llama"), tiny_checkpoint(tmp_path / "gpt2", "gpt2")
    built = []
    real = loading.AutoModelForCausalLM.from_config
    monkeypatch.setattr(
        loading.AutoModelForCausalLM, "from_config", lambda config: built.append(config) or real(config)
    )
    assert position_table(llama) is None and built == []
    assert position_table(gpt2).positions == 32 and len(built) == 1


def test_sft_refuses_a_max_length_beyond_learned_positions(tmp_path):
    folder = tiny_checkpoint(tmp_path / "gpt2", "gpt2")
    demos = [{"prompt": p, "completion": LONG} for p in PROMPTS]
    config = load_config(overrides=[*SMALL, "sft.max_length=64"])
    expected = (
        r"sft\.max_length=64 exceeds the 32 positions of the learned position embeddings of model "
        r".*gpt2 \(gpt2, n_positions\), and demonstration 1 has 64 tokens after the cut: "
        r"lower sft\.max_length to 32 or less"
    )
    with pytest.raises(ValueError, match=expected):
        run_sft(config, folder, demos, tmp_path / "sft", show_progress=False)
    assert not (tmp_path / "sft" / "model").exists()
    # Cut to the table, the same demonstrations train.
    fits = load_config(overrides=[*SMALL, "sft.max_length=32"])
    assert run_sft(fits, folder, demos, tmp_path / "sft", show_progress=False)["steps"] == 1


def test_rope_models_take_any_length(tmp_path):
    # max_position_embeddings only sizes RoPE's cache: longer sequences run, so no error.
    folder = tiny_checkpoint(tmp_path / "llama", "llama", positions=32)
    demos = [{"prompt": p, "completion": LONG} for p in PROMPTS]
    config = load_config(overrides=[*SMALL, "sft.max_length=64"])
    assert run_sft(config, folder, demos, tmp_path / "sft", show_progress=False)["steps"] == 1


def test_ppo_refuses_prompt_plus_response_beyond_learned_positions(tmp_path):
    folder = tiny_checkpoint(tmp_path / "gpt2", "gpt2")
    prompts = [*PROMPTS, "Say a colour number 12, please."]
    config = load_config(overrides=[*SMALL, "ppo.max_new_tokens=30"])
    expected = (
        r"prompt 9 \(\d+ tokens: 'Say a colour number 12, please\.'\) plus ppo\.max_new_tokens=30 "
        r"response tokens is \d+ tokens, more than the 32 positions .*: lower ppo\.max_new_tokens to \d+ "
        r"or shorten the prompts"
    )
    with pytest.raises(ValueError, match=expected):
        run_ppo(config, folder, folder, prompts, tmp_path / "ppo", False)
    assert not (tmp_path / "ppo" / "model").exists()


def test_feedback_sampling_refuses_prompt_plus_response_beyond_learned_positions(tmp_path):
    """The feedback stage (demo, loop) checks its lengths before sampling, as the training stages do."""
    import random

    from rlhfkit.pipeline import comparison_items

    folder = tiny_checkpoint(tmp_path / "gpt2", "gpt2")
    config = load_config(overrides=[*SMALL, "feedback.max_new_tokens=30"])
    expected = r"plus feedback\.max_new_tokens=30 response tokens is \d+ tokens, more than the 32 positions"
    with pytest.raises(ValueError, match=expected):
        comparison_items(folder, PROMPTS, config.feedback, 0, random.Random(0), "gpt2")
    # A partner model is checked too: here the policy fits and the partner does not.
    llama = tiny_checkpoint(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match=expected):
        comparison_items(llama, PROMPTS, config.feedback, 0, random.Random(0), "llama", (folder, "gpt2"))
    fits = load_config(overrides=[*SMALL, "feedback.max_new_tokens=4"])
    assert comparison_items(folder, PROMPTS, fits.feedback, 0, random.Random(0), "gpt2")


def test_load_tokenizer_refuses_one_with_neither_pad_nor_eos(tmp_path):
    bare = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(["<unk>"]), unk_token="<unk>")
    bare.save_pretrained(tmp_path)
    expected = re.escape(f"tokenizer {tmp_path}: it has neither a pad token nor an EOS token")
    with pytest.raises(ValueError, match=expected):
        load_tokenizer(tmp_path)


def test_load_tokenizer_refuses_a_pad_without_eos(tmp_path):
    # Responses end with EOS and sampling stops at it: a pad alone is not enough.
    padded = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(["<unk>", "<pad>"]), unk_token="<unk>", pad_token="<pad>"
    )
    padded.save_pretrained(tmp_path)
    expected = re.escape(f"tokenizer {tmp_path}: it has a pad token (<pad>) but no EOS token")
    with pytest.raises(ValueError, match=expected):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "make",
    [
        lambda: train_tokenizer(TEXTS, vocab_size=300),
        gpt2_style_tokenizer,
        qwen2_style_tokenizer,
        gemma_style_tokenizer,
    ],
    ids=["embedded-llama", "gpt2", "qwen2", "gemma"],
)
def test_load_tokenizer_takes_the_usual_tokenizers(tmp_path, make):
    make().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None


def test_pretrain_refuses_a_block_size_beyond_the_tiny_gpt2s_positions(tmp_path):
    from rlhfkit.train.pretrain import run_pretrain

    config = load_config(
        overrides=[
            "model.arch=gpt2",
            "model.vocab_size=300",
            "model.max_positions=32",
            "pretrain.block_size=64",
        ]
    )
    expected = r"pretrain\.block_size=64 exceeds the 32 positions .* tiny gpt2 model \(model\.max_positions\)"
    with pytest.raises(ValueError, match=expected):
        run_pretrain(config, TEXTS, tmp_path / "pretrain", show_progress=False)
    assert not (tmp_path / "pretrain" / "model").exists()
