"""Generation tokens/s: rlhfkit's rollout path against plain `model.generate`, same prompts and sampling.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rollout.py --prompts 32 --max-new-tokens 48 --repeats 3

Both sides sample from the bench's tiny model (bench/vs_trl.py `prepare`) at temperature 1,
no top-k/top-p, from the same left-padded prompt batch and the same torch seed. They draw
from the same distribution but not the same tokens: `generate` samples with
`torch.multinomial`, the rlhfkit side (`rollout.generate.sample_responses`, a KV-cache loop
in `rollout.decode`) by inverse CDF, and it also cuts each row at EOS and returns token
lists, as training uses them. Tokens/s counts generated tokens (up to and including EOS)
per wall second; repeats alternate the order.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import BENCH_DIR, prepare, read_jsonl  # noqa: E402

from rlhfkit.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from rlhfkit.models.tokenizer import prompt_token_ids  # noqa: E402
from rlhfkit.rollout.batch import left_pad  # noqa: E402
from rlhfkit.rollout.generate import cut_at_eos, generation_config, sample_responses  # noqa: E402


def plain_generate(model, prompts: list[list[int]], eos: int, pad: int, max_new: int) -> int:
    """model.generate on one left-padded batch; the number of generated tokens up to EOS."""
    ids, mask = left_pad(prompts, pad)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return sum(len(cut_at_eos(row.tolist(), eos, pad)) for row in out[:, ids.size(1) :])


def ours(model, prompts: list[list[int]], eos: int, pad: int, max_new: int) -> int:
    """rlhfkit's rollout path; the number of generated tokens."""
    responses = sample_responses(
        model, prompts, eos_id=eos, pad_id=pad, max_new_tokens=max_new, temperature=1.0
    )
    return sum(len(r) for r in responses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=BENCH_DIR / ".work")
    args = parser.parse_args()
    if min(args.prompts, args.max_new_tokens, args.repeats) < 1:
        parser.error("--prompts, --max-new-tokens and --repeats must be at least 1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    prepare(args.work)
    tokenizer = load_tokenizer(args.work / "model")
    model = load_causal_lm(args.work / "model").eval()
    texts = [r["prompt"] for r in read_jsonl(args.work / "prompts.jsonl")][: args.prompts]
    prompts = [prompt_token_ids(tokenizer, p) for p in texts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert generation_config(eos, pad, args.max_new_tokens, 1.0).top_k == 0  # same sampling as plain
    sides = {"rlhfkit": ours, "generate": plain_generate}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    counts: dict[str, list[int]] = {k: [] for k in sides}
    with torch.inference_mode():
        plain_generate(model, prompts[:2], eos, pad, 4)  # warm-up, not timed
        for r in range(args.repeats):
            for name in sides if r % 2 == 0 else reversed(list(sides)):
                torch.manual_seed(r)
                start = time.perf_counter()
                n = sides[name](model, prompts, eos, pad, args.max_new_tokens)
                rates[name].append(n / (time.perf_counter() - start))
                counts[name].append(n)
    a, b = statistics.median(rates["rlhfkit"]), statistics.median(rates["generate"])
    print(
        f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, "
        f"median of {args.repeats} alternating repeats"
    )
    print("| path | tokens/s | generated tokens |\n|---|---|---|")
    print(f"| rlhfkit sample_responses | {a:.0f} | {counts['rlhfkit']} |")
    print(f"| plain model.generate | {b:.0f} | {counts['generate']} |")
    print(f"| ratio | {a / b:.2f}x | |")


if __name__ == "__main__":
    main()
