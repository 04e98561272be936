"""Text metrics of a policy's outputs: length, diversity (distinct-n), ROUGE-L and BLEU.

Small pure functions on whitespace tokens (lower-cased), so they need no tokenizer
download and give the same numbers everywhere. ROUGE-L is the LCS F-measure (Lin 2004),
BLEU is corpus-level BLEU-4 with clipped counts and the brevity penalty (Papineni et al.
2002), both taking the best of several references.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def words(text: str) -> list[str]:
    """Lower-cased whitespace tokens: the unit every metric here counts."""
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of a token list."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams of all texts; 0 when there are none.

    The common reading of Li et al. 2016's distinct-n; the paper divides by the number of
    tokens instead, which gives the same distinct-1 and a slightly lower distinct-2.
    """
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len a * len b))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 of a candidate against its best-matching reference."""
    cand = words(candidate)
    best = 0.0
    for ref in references:
        r = words(ref)
        lcs = lcs_length(cand, r)
        if lcs:
            precision, recall = lcs / len(cand), lcs / len(r)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU in [0, 1]: clipped n-gram precisions (n <= max_n), geometric mean, brevity penalty.

    Each candidate has one or more references; n-gram counts are clipped by their largest
    count in any reference, and the reference length is the one closest to the candidate's.
    """
    if len(candidates) != len(references):
        raise ValueError(
            f"corpus_bleu needs one reference list per candidate; got {len(candidates)} candidates "
            f"and {len(references)} reference lists"
        )
    matches, totals = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for candidate, refs in zip(candidates, references, strict=True):
        if not refs:
            raise ValueError("corpus_bleu: every candidate needs at least one reference")
        cand, ref_tokens = words(candidate), [words(r) for r in refs]
        cand_len += len(cand)
        # Closest reference length, the shorter one on a tie (as sacrebleu and NLTK do).
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = Counter(ngrams(cand, n))
            ceiling: Counter = Counter()
            for r in ref_tokens:
                ceiling |= Counter(ngrams(r, n))
            matches[n - 1] += sum(min(c, ceiling[g]) for g, c in counts.items())
            totals[n - 1] += max(len(cand) - n + 1, 0)
    if cand_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return brevity * math.exp(log_precision)


def text_metrics(texts: Sequence[str], references: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """Mean length in words, distinct-1/2, and ROUGE-L/BLEU on the texts that have references.

    `references[i]` lists the references of `texts[i]` (empty when it has none); the
    reference metrics appear only when at least one text has a reference.
    """
    out = {
        "length_words": round(sum(len(words(t)) for t in texts) / max(len(texts), 1), 3),
        "distinct_1": round(distinct_n(texts, 1), 4),
        "distinct_2": round(distinct_n(texts, 2), 4),
    }
    if references is not None:
        if len(references) != len(texts):
            raise ValueError(f"text_metrics got {len(texts)} texts but {len(references)} reference lists")
        having = [(t, r) for t, r in zip(texts, references, strict=True) if r]
        if having:
            out["rouge_l"] = round(sum(rouge_l(t, r) for t, r in having) / len(having), 4)
            out["bleu"] = round(corpus_bleu([t for t, _ in having], [r for _, r in having]), 4)
            out["n_with_references"] = len(having)
    return out
