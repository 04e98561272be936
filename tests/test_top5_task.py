"""The built-in top-5 task: its data splits and its gold utility."""

import pytest

from rlhfkit.tasks import load_task, resolve_gold
from rlhfkit.tasks.top5.catalog import load_catalog
from rlhfkit.tasks.top5.gold import gold_utility, score_parts, topic_of


@pytest.fixture(scope="module")
def task():
    return load_task("top5", seed=0)


def test_catalog_size():
    topics = load_catalog()
    assert len(topics) >= 40 and all(len(t.items) >= 15 for t in topics)


def test_heldout_prompts_are_unseen_combinations(task):
    assert len(task.heldout_prompts) >= 200
    train = set(task.train_prompts)
    demo_prompts = {d["prompt"] for d in task.demonstrations}
    assert not set(task.heldout_prompts) & train
    assert not set(task.heldout_prompts) & demo_prompts
    # Every held-out topic is still seen in training, only in other phrasings.
    train_topics = {topic_of(p).id for p in task.train_prompts}
    assert {topic_of(p).id for p in task.heldout_prompts} <= train_topics


def test_demonstrations_are_five_distinct_on_topic_items_for_part_of_the_topics(task):
    topics = {topic_of(d["prompt"]).id for d in task.demonstrations}
    assert 0.3 * len(load_catalog()) < len(topics) < len(load_catalog())
    for demo in task.demonstrations:
        assert gold_utility(demo["prompt"], demo["completion"]) == 1.0


def test_corpus_is_varied(task):
    corpus = task.corpus
    assert len(corpus) > 10_000
    assert any(doc.startswith("One of the best ") for doc in corpus)  # plain sentences
    assert any("\n- " in doc for doc in corpus)  # other list formats
    assert any(doc.startswith("Q: ") for doc in corpus)  # requests answered
    lengths = {doc.count("\n") for doc in corpus}
    assert len(lengths) > 5


def test_task_is_deterministic_per_seed():
    a, b, c = load_task("top5", 0), load_task("top5", 0), load_task("top5", 1)
    assert a.train_prompts == b.train_prompts and a.demonstrations == b.demonstrations
    assert a.demonstrations != c.demonstrations


PROMPT = "Give me the top 5 horror films."


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("1. Get Out\n2. The Thing\n3. Halloween\n4. The Exorcist\n5. Psycho", 1.0),
        # one off-topic item: relevance 4/5, minus 0.1
        ("1. Get Out\n2. The Thing\n3. Halloween\n4. The Exorcist\n5. Paris", 0.8 - 0.1),
        # a duplicate: relevance 4/5, minus 0.2
        ("1. Get Out\n2. The Thing\n3. Halloween\n4. The Exorcist\n5. Get Out", 0.8 - 0.2),
        # four items: relevance 4/5, minus 0.15 for the count
        ("1. Get Out\n2. The Thing\n3. Halloween\n4. The Exorcist", 0.8 - 0.15),
        # rambling line after a perfect list
        ("1. Get Out\n2. The Thing\n3. Halloween\n4. The Exorcist\n5. Psycho\nHope this helps.", 0.9),
        ("", -0.75),
    ],
)
def test_gold_utility_known_values(response, expected):
    parts = score_parts(PROMPT, response)
    assert parts["n_items"] <= 6
    if "Get Out" in response:
        # The catalog must hold the items this test relies on.
        assert "Get Out" in topic_of(PROMPT).items and "Psycho" in topic_of(PROMPT).items
    assert gold_utility(PROMPT, response) == pytest.approx(expected)


def test_gold_is_resolved_by_import_path(task):
    assert resolve_gold(task) is gold_utility


def test_probe_pairs_differ_by_exactly_the_named_defect():
    from rlhfkit.tasks import resolve_probes
    from rlhfkit.tasks.top5.probes import KINDS

    task = load_task("rlhfkit.tasks.top5", 0)
    prompts = task.heldout_prompts
    probes = resolve_probes(task)(prompts, 0)
    assert probes == resolve_probes(task)(prompts, 0)  # seeded
    assert set(probes) == set(KINDS) and all(len(v) == len(prompts) for v in probes.values())
    # What each defect changes in the gold judge's parts of a perfect list, and nothing else.
    changed = {
        "off_topic_item": {"relevance": 0.8, "off_topic": 1},
        "duplicate_item": {"relevance": 0.8, "duplicates": 1},
        "six_items": {"n_items": 6},
        "four_items": {"n_items": 4, "relevance": 0.8},
        "trailing_line": {"other_lines": 1},
    }
    for kind, triples in probes.items():
        assert [p for p, _, _ in triples] == prompts
        for prompt, better, worse in triples:
            assert gold_utility(prompt, better) == 1.0 and gold_utility(prompt, worse) < 1.0
            good, bad = score_parts(prompt, better), score_parts(prompt, worse)
            assert {k: v for k, v in bad.items() if good[k] != v} == changed[kind], (kind, worse)


@pytest.mark.parametrize(
    ("field", "spec", "message"),
    [
        ("gold", "rlhfkit.tasks.top5.gold", "import path 'module:function'"),
        ("probes", "no_such_module_xyz:probes", "cannot import 'no_such_module_xyz'"),
        ("probes", "rlhfkit.tasks.top5.probes:no_such_function", "has no callable 'no_such_function'"),
        ("gold", "rlhfkit.tasks.top5.probes:KINDS", "has no callable 'KINDS'"),
    ],
)
def test_a_bad_judge_or_probe_path_names_the_task_and_field(field, spec, message):
    from dataclasses import replace

    from rlhfkit.tasks import resolve_probes

    task = replace(load_task("rlhfkit.tasks.top5", 0), name="mine", **{field: spec})
    resolve = resolve_gold if field == "gold" else resolve_probes
    with pytest.raises(ValueError, match=f"task 'mine': {field} '{spec}'") as err:
        resolve(task)
    assert message in str(err.value)
