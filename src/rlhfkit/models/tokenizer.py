"""Train a byte-level BPE tokenizer and wrap it as a Hugging Face fast tokenizer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# One turn per role marker; the assistant turn ends with EOS, which is where generation stops.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# Superword pieces: only a newline, a run of digits or a punctuation mark splits the text before
# BPE, so merges may cross spaces and a frequent phrase becomes one token.
SUPERWORD_SPLIT = r"\n|[0-9]+|[^\w\s]"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, superwords: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts`, with chat special tokens.
    `superwords`: merges may cross spaces (SentencePiece without whitespace splitting), so a
    frequent multi-word phrase ("Roast turkey") becomes one token."""
    tok = Tokenizer(models.BPE())
    if superwords:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SUPERWORD_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        # The full byte alphabet, so any text (a user's, a model's) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give tokenizers without a pad token (GPT-2, Llama) one: EOS, masked out everywhere."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def chat_turn_end(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template closes an assistant turn with, where that is not EOS
    (Gemma's <end_of_turn>, Phi-3's <|end|>, ChatML's <|im_end|> under a base model's EOS); else None."""
    if not tokenizer.chat_template:
        return None
    marker = "rlhfkit turn end marker"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template with rules of its own (a system turn first, ...): leave EOS alone
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    if not after or after[0] == tokenizer.eos_token_id:
        return None
    added = tokenizer.added_tokens_decoder.get(after[0])
    return added.content if added is not None and added.special else None


def use_chat_turn_end_as_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the chat template's end-of-turn token the EOS, where the two differ.

    A demonstration ends with EOS and sampling stops at it, so it must be the token the template
    (and the instruct model) ends an assistant turn with: with Gemma's EOS <eos> the model would
    learn a turn end it never saw, and an instruct model would sample <end_of_turn> and go on."""
    turn_end = chat_turn_end(tokenizer)
    if turn_end is not None:
        tokenizer.eos_token = turn_end


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[dict]) -> list[int]:
    """Token ids of a user prompt (or chat messages) followed by the assistant turn marker."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # A base model with no chat template: plain text, the way it was pretrained.
    text = "\n".join(m["content"] for m in messages) + "\n"
    return tokenizer(text)["input_ids"]


def completion_token_ids(tokenizer: PreTrainedTokenizerBase, completion: str) -> list[int]:
    """Token ids of an assistant completion, ending with EOS."""
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def document_token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of plain documents (pretraining text): BOS, where the tokenizer has one (Qwen2's has
    none), the text, then EOS."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return [bos + doc + [tokenizer.eos_token_id] for doc in ids]


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """Save with save_pretrained, so AutoTokenizer.from_pretrained loads it."""
    tokenizer.save_pretrained(str(out_dir))
