"""The built-in task: a top-5 list for a user's request.

Everything is generated from the shipped catalog with a seed: prompts from varied
templates, a noisy pretraining corpus, demonstrations for only part of the topics,
and held-out prompts whose topic/phrasing combinations never appear in training.
The gold utility lives in `rlhfkit.tasks.top5.gold`; this module does not import it.
"""

from __future__ import annotations

import random

from rlhfkit.tasks import Task
from rlhfkit.tasks.top5.catalog import Topic, load_catalog

TEMPLATES = (
    "Give me the top 5 {p}.",
    "What are your top five {p}?",
    "List five {p}.",
    "Can you suggest 5 {p}?",
    "I need a top 5 list of {p}.",
    "Name five {p}, please.",
    "Top 5 {p}?",
    "Please recommend five {p}.",
    "What would be the five best {p}?",
    "Make me a list of the top 5 {p}.",
    "Suggest your five favourite {p}.",
    "Could you give me five {p}?",
    "I would like a top five list of {p}.",
    "Which 5 {p} would you pick?",
    "Share a list of five great {p}.",
    "Help me find the top 5 {p}.",
    "Write down five {p} for me.",
    "What are five {p} I should know about?",
)
HELDOUT_TEMPLATES_PER_TOPIC = 5
DEMO_TOPIC_SHARE = 0.6
# Demonstrations are the expensive kind of human data: a small budget, so SFT learns the
# shape of an answer only roughly and preferences have something left to teach.
N_DEMONSTRATIONS = 160

_HEADERS = (
    "Top {n} {p}:",
    "Some {p}:",
    "Here are a few {p}.",
    "My favourite {p}",
    "{P} to consider:",
    "A list of {p}",
    "The best {p} I know:",
    "{P}",
    "Popular {p}:",
    "Good {p} include",
)
_TRAILERS = (
    "Enjoy!",
    "There are many more.",
    "These are all good choices.",
    "Let me know if you want more.",
    "Hope this helps.",
    "I like them all.",
)
# The topic comes before its items, so the model learns to retrieve items from a request.
_SENTENCES = (
    "One of the best {p} is {i}.",
    "If you like {p}, try {i}.",
    "Among {p}, {i} and {j} stand out.",
    "Good {p}: {i}, {j} and {k}.",
    "For {p}, many people pick {i}.",
    "Talking about {p}? {i}.",
    "The {p} I would not forget: {i} and {j}.",
    "{P}: {i}.",
)


def _split_templates(topics: tuple[Topic, ...], rng: random.Random) -> dict[str, list[int]]:
    """For each topic, the template indices held out from all training data."""
    return {t.id: sorted(rng.sample(range(len(TEMPLATES)), HELDOUT_TEMPLATES_PER_TOPIC)) for t in topics}


def _sentence_case(phrase: str) -> str:
    """First letter upper case, the rest untouched (str.capitalize would lower "North America")."""
    return phrase[:1].upper() + phrase[1:]


def format_list(items: list[str]) -> str:
    """The target format: a numbered list, one item per line."""
    return "\n".join(f"{k}. {item}" for k, item in enumerate(items, 1))


def _corpus_list(topic: Topic, topics: tuple[Topic, ...], rng: random.Random) -> str:
    n = rng.randint(2, 9)
    items = rng.sample(topic.items, min(n, len(topic.items)))
    if rng.random() < 0.15:  # partly off-topic: a stray item or two from another topic
        other = rng.choice([t for t in topics if t.id != topic.id])
        for _ in range(rng.randint(1, 2)):
            items[rng.randrange(len(items))] = rng.choice(other.items)
    if rng.random() < 0.15:  # duplicates
        items.insert(rng.randrange(len(items) + 1), rng.choice(items))
    header = rng.choice(_HEADERS).format(n=len(items), p=topic.phrase, P=_sentence_case(topic.phrase))
    style = rng.random()
    if style < 0.5:
        body = format_list(items)
    elif style < 0.65:
        body = "\n".join(f"{k}) {item}" for k, item in enumerate(items, 1))
    elif style < 0.85:
        body = "\n".join(f"- {item}" for item in items)
    elif style < 0.9:
        body = "\n".join(f"* {item}" for item in items)
    else:
        body = ", ".join(items[:-1]) + f" and {items[-1]}." if len(items) > 1 else items[0] + "."
    text = f"{header}\n{body}"
    if rng.random() < 0.2:
        text += "\n" + rng.choice(_TRAILERS)
    return text


def _corpus_sentences(topic: Topic, rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(1, 3)):
        i, j, k = rng.sample(topic.items, 3)
        out.append(
            rng.choice(_SENTENCES).format(i=i, j=j, k=k, p=topic.phrase, P=_sentence_case(topic.phrase))
        )
    return " ".join(out)


def _corpus_qa(topic: Topic, topics: tuple[Topic, ...], rng: random.Random) -> str:
    question = rng.choice(TEMPLATES).format(p=topic.phrase)
    return f"Q: {question}\nA: {_corpus_list(topic, topics, rng).split(chr(10), 1)[1]}"


def build_corpus(seed: int, n_docs: int = 24000) -> list[str]:
    """Pretraining documents: lists of any length and format, some off-topic, sentences."""
    topics = load_catalog()
    rng = random.Random(f"corpus-{seed}")
    docs = []
    for _ in range(n_docs):
        topic = rng.choice(topics)
        kind = rng.random()
        if kind < 0.45:
            docs.append(_corpus_list(topic, topics, rng))
        elif kind < 0.85:
            docs.append(_corpus_sentences(topic, rng))
        else:
            docs.append(_corpus_qa(topic, topics, rng))
    return docs


def build(seed: int = 0) -> Task:
    """The top-5 task for a seed: prompts, held-out prompts, corpus and demonstrations."""
    topics = load_catalog()
    rng = random.Random(f"top5-{seed}")
    heldout_idx = _split_templates(topics, rng)
    demo_topics = set(rng.sample([t.id for t in topics], round(DEMO_TOPIC_SHARE * len(topics))))
    train, heldout, demo_prompts = [], [], []
    for topic in topics:
        for k, template in enumerate(TEMPLATES):
            prompt = template.format(p=topic.phrase)
            if k in heldout_idx[topic.id]:
                heldout.append(prompt)
                continue
            train.append(prompt)
            if topic.id in demo_topics:
                demo_prompts.append((prompt, topic))
    demos = [
        {"prompt": prompt, "completion": format_list(rng.sample(topic.items, 5))}
        for prompt, topic in rng.sample(demo_prompts, min(N_DEMONSTRATIONS, len(demo_prompts)))
    ]
    rng.shuffle(train)
    return Task(
        name="top5",
        train_prompts=train,
        heldout_prompts=heldout,
        demonstrations=demos,
        corpus=build_corpus(seed),
        gold="rlhfkit.tasks.top5.gold:gold_utility",
        probes="rlhfkit.tasks.top5.probes:probe_pairs",
    )
