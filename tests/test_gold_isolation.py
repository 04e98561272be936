"""The reward model and PPO cannot reach the gold utility: by imports, and by data."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import rlhfkit

PACKAGE = Path(rlhfkit.__file__).parent
# Code that trains or feeds training; none of it may import a judge or the simulated crowd.
TRAINING_PACKAGES = ("train", "algos", "models", "rollout", "data")
FORBIDDEN = ("rlhfkit.tasks.top5.gold", "rlhfkit.crowd.simulate", "rlhfkit.eval")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_training_code_never_imports_a_judge():
    offenders = []
    for package in TRAINING_PACKAGES:
        for path in (PACKAGE / package).rglob("*.py"):
            for name in _imports(path):
                if name.startswith(FORBIDDEN) or name.endswith(".gold") or "gold_utility" in name:
                    offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, offenders


def test_training_stages_and_the_task_do_not_load_gold_at_runtime():
    code = (
        "import sys\n"
        "import rlhfkit.train.rm, rlhfkit.train.ppo, rlhfkit.train.sft, rlhfkit.train.pretrain\n"
        "from rlhfkit.tasks import load_task\n"
        "task = load_task('rlhfkit.tasks.top5', 0)\n"
        "assert task.train_prompts and task.demonstrations\n"
        "bad = [m for m in sys.modules if m.endswith('.gold') or m.startswith('rlhfkit.crowd.simulate')]\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout


def test_exported_pairs_carry_no_gold(tmp_path):
    from rlhfkit.feedback.store import FeedbackStore

    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    project = store.create_project("p")
    store.add_items(project, [{"prompt": "Top 5 moons?", "responses": ["1. Io", "1. Mars"]}])
    annotator = store.add_annotator("a", kind="simulated")
    task = store.next_task(project, annotator)
    store.submit_comparison(task.token, annotator, "left")
    store.export_preferences(project, tmp_path / "pairs.jsonl")
    store.close()
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert rows
    for row in rows:
        assert not any("gold" in key or "utility" in key or "score" in key for key in row), row
