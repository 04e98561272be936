"""Bad input at the command line fails with a message that names what is wrong, exit code != 0."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from rlhfkit.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_missing_config_file(tmp_path):
    result = _run("sft", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run"))
    assert result.exit_code != 0
    assert "config file not found" in _flat(result.output) and "nope.yaml" in result.output


def test_unknown_set_key(tmp_path):
    result = _run("ppo", "--set", "ppo.kl_coeff=0.1", "--out", str(tmp_path / "run"))
    assert result.exit_code != 0
    out = _flat(result.output)
    assert "unknown config key 'ppo.kl_coeff'" in out and "kl_coef" in out


def test_bad_value_names_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ppo:\n  kl_coef: lots\n")
    result = _run("ppo", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert result.exit_code != 0
    assert "ppo.kl_coef" in _flat(result.output)


def test_unknown_key_in_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rm:\n  epochz: 3\n")
    result = _run("rm", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert result.exit_code != 0
    assert "rm.epochz: unknown key" in _flat(result.output)


def test_broken_data_line_names_file_line_and_field(tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "Top 5 moons?", "completion": "1. Io"}\n{"prompt": "x", "completion": ""}\n')
    run_dir = tmp_path / "run"
    # The model folder need not exist: the data file is checked before any model is loaded.
    result = _run(
        "sft",
        "--set",
        f"data.demonstrations={data}",
        "--set",
        f"model.name_or_path={tmp_path}",
        "--out",
        str(run_dir),
    )
    assert result.exit_code != 0
    out = _flat(result.output)
    assert f"{data}:2" in out and "completion" in out


def test_broken_json_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    result = _run("rm", "--set", f"data.preferences={data}", "--out", str(tmp_path / "run"))
    assert result.exit_code != 0
    assert f"{data}:2" in _flat(result.output)


def test_stage_without_upstream_says_what_to_run(tmp_path):
    result = _run("ppo", "--out", str(tmp_path / "run"))
    assert result.exit_code != 0
    assert "rlhfkit sft" in _flat(result.output)


def test_config_show_prints_resolved_yaml():
    import yaml

    result = _run("config", "show", "ppo", "--set", "ppo.kl_coef=0.2")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["ppo"]["kl_coef"] == 0.2
    assert _run("config", "show", "ppx").exit_code != 0


def test_config_show_ppo_is_commented_yaml_of_the_defaults():
    import yaml

    from rlhfkit.config import PPOConfig

    result = _run("config", "show", "ppo")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert PPOConfig.model_validate(yaml.safe_load(result.stdout)["ppo"]) == PPOConfig()
    keys = [i for i, line in enumerate(lines) if line.startswith("  ") and not line.strip().startswith("#")]
    assert len(keys) == len(PPOConfig.model_fields)
    # Every key has its meaning on the line above it.
    assert all(lines[i - 1].strip().startswith("# ") for i in keys)
    whole = _run("config", "show")
    assert whole.exit_code == 0 and yaml.safe_load(whole.stdout)["ppo"]["kl_coef"] == PPOConfig().kl_coef


def test_feedback_export_unknown_project_and_format(tmp_path):
    from rlhfkit.feedback.store import FeedbackStore

    db = f"sqlite:///{tmp_path / 'f.db'}"
    store = FeedbackStore(db)
    store.create_project("films")
    store.close()
    result = _run("feedback", "export", "--db", db, "--project", "nope", "--out", str(tmp_path / "x.jsonl"))
    assert result.exit_code == 2
    assert "no feedback project named 'nope' (the projects here: 'films')" in _flat(result.output)
    result = _run(
        "feedback",
        "export",
        "--db",
        db,
        "--project",
        "p",
        "--out",
        str(tmp_path / "x.jsonl"),
        "--format",
        "csv",
    )
    assert result.exit_code != 0 and "--format 'csv'" in _flat(result.output)


def test_a_refused_command_leaves_the_run_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "rm").mkdir(parents=True)
    finished = '{"n_train_pairs": 3, "fingerprint": "abc"}'
    (run_dir / "rm" / "summary.json").write_text(finished)
    (run_dir / "config.yaml").write_text("seed: 7\n")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    result = _run("rm", "--set", f"data.preferences={bad}", "--out", str(run_dir))
    assert result.exit_code == 2 and "field 'rejected'" in _flat(result.output)
    # The finished stage stays finished, and config.yaml still holds the command that made it.
    assert (run_dir / "rm" / "summary.json").read_text() == finished
    assert (run_dir / "config.yaml").read_text() == "seed: 7\n"
    refused = _run("eval", "--out", str(run_dir), "--judge", "rm", "--reference", "ppo", "--policies", "sft")
    assert refused.exit_code == 2 and "error:" in _flat(refused.output)
    assert (run_dir / "config.yaml").read_text() == "seed: 7\n"
    # A refused eval creates nothing: no empty eval/ folder beside the run's stages.
    assert not (run_dir / "eval").exists()


def test_out_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a run")
    result = _run("sft", "--out", str(afile))
    assert result.exit_code == 2
    assert f"--out {afile}: that is a file, not a run directory" in _flat(result.output)
    assert afile.read_text() == "not a run"


def test_config_files_that_are_not_a_config(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"\xff\xfeppo: {}\n")
    result = _run("config", "show", "-c", str(latin))
    assert result.exit_code == 2 and f"{latin}: not UTF-8 text (byte 0" in _flat(result.output)
    result = _run("config", "show", "-c", str(tmp_path))
    assert result.exit_code == 2 and f"{tmp_path}: a directory, not a config file" in _flat(result.output)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("ppo: 5\n")
    result = _run("config", "show", "-c", str(scalar), "--set", "ppo.kl_coef=1")
    assert result.exit_code == 2
    assert "--set ppo.kl_coef: ppo is a section, but the config file gives it the value 5" in _flat(
        result.output
    )


def test_an_empty_section_is_empty_and_set_values_are_named(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("ppo:\n")
    result = _run("config", "show", "ppo", "-c", str(empty), "--set", "ppo.kl_coef=0.3")
    assert result.exit_code == 0 and "kl_coef: 0.3" in result.output
    result = _run("config", "show", "--set", "ppo.kl_coef=abc")
    assert result.exit_code == 2
    assert "ppo.kl_coef: Input should be a valid number" in _flat(result.output)
    assert "(from --set ppo.kl_coef=abc)" in _flat(result.output)


def test_feedback_commands_that_read_create_no_database_and_refuse_a_folder_as_out(tmp_path):
    missing = tmp_path / "nothere.db"
    for command in (
        ["export", "--project", "p", "--out", str(tmp_path / "x.jsonl")],
        ["aggregate", "--project", "p", "--out", str(tmp_path / "x.jsonl")],
        ["quality", "--project", "p"],
    ):
        for db in (str(missing), str(tmp_path)):
            result = _run("feedback", command[0], "--db", db, *command[1:])
            assert result.exit_code == 2, result.output
            assert f"--db '{db}': cannot open the feedback database: no SQLite database file" in _flat(
                result.output
            )
    assert not missing.exists()
    for command in ("export", "aggregate"):
        result = _run("feedback", command, "--db", str(missing), "--project", "p", "--out", str(tmp_path))
        assert result.exit_code == 2
        assert f"--out {tmp_path}: a directory; give the path of the file to write" in _flat(result.output)


def test_a_refused_import_creates_no_project(tmp_path):
    from rlhfkit.feedback.store import FeedbackStore

    db = str(tmp_path / "f.db")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "q", "completions": ["a", "b", "c"]}\n{"prompt": "", "completions": ["a", "b"]}\n'
    )
    result = _run("feedback", "import", "--db", db, "--project", "p3", "--file", str(bad))
    assert result.exit_code == 2 and "bad.jsonl:1: field 'completions': needs exactly 2" in _flat(
        result.output
    )
    store = FeedbackStore(db)
    assert store.projects() == []
    store.close()
    # So a retry with the right task type makes the project of that type.
    good = tmp_path / "rank.jsonl"
    good.write_text('{"prompt": "q", "completions": ["a", "b", "c"]}\n')
    result = _run(
        "feedback", "import", "--db", db, "--project", "p3", "--file", str(good), "--task-type", "ranking"
    )
    assert result.exit_code == 0 and "imported 1 items into project 'p3' (ranking)" in _flat(result.output)


def test_a_model_folder_that_is_missing_or_empty_is_named(tmp_path):
    from rlhfkit.models.loading import model_source

    missing = tmp_path / "does" / "not" / "exist"
    result = _run("sft", "--out", str(tmp_path / "run"), "--set", f"model.name_or_path={missing}")
    assert result.exit_code == 2 and f"model {missing}: no such folder" in _flat(result.output)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run("sft", "--out", str(tmp_path / "run"), "--set", f"model.name_or_path={empty}")
    assert result.exit_code == 2 and f"model {empty}: no tokenizer in that folder" in _flat(result.output)
    # Hub ids pass through to transformers as they are.
    assert model_source("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B" and model_source("gpt2") == "gpt2"
    with pytest.raises(ValueError, match="no saved model in that folder"):
        model_source(empty)


def test_a_bad_pool_is_refused_before_any_sampling(tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text("annotators: []\n")
    run_dir = tmp_path / "run"
    # No SFT model in the run: the pool is refused first, not the missing model after sampling.
    result = _run("feedback", "simulate", "--out", str(run_dir), "--set", f"feedback.pool={pool}")
    assert result.exit_code == 2 and f"{pool}: expected a mapping with a non-empty list" in _flat(
        result.output
    )
    assert not (run_dir / "feedback.db").exists()


def test_a_pool_smaller_than_the_overlap_is_refused_before_any_sampling(tmp_path):
    run_dir = tmp_path / "run"
    # Nine annotators in the default pool: ten labels per item could never be given.
    result = _run("feedback", "simulate", "--out", str(run_dir), "--set", "feedback.overlap=10")
    assert result.exit_code == 2
    assert "feedback.overlap=10 asks for 10 annotators per item, but the simulated pool has 9" in _flat(
        result.output
    )
    assert not (run_dir / "feedback.db").exists()


def test_a_hub_model_that_cannot_be_fetched_is_an_error_not_a_traceback(tmp_path, monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    result = _run("sft", "--out", str(tmp_path / "run"), "--set", "model.name_or_path=someorg/somemodel")
    assert result.exit_code == 2
    assert "error: We couldn't connect to 'https://huggingface.co' to load the files." in _flat(result.output)


def test_resume_is_refused_by_stages_without_checkpoints(tmp_path):
    for stage in ("bon", "expert_iter"):
        result = _run(stage, "--resume", "--out", str(tmp_path / "run"))
        assert result.exit_code == 2
        assert f"--resume: {stage} writes no checkpoints" in _flat(result.output)


def test_feedback_simulate_shows_its_progress(tmp_path):
    from rlhfkit.models.loading import save_model, tiny_causal_lm
    from rlhfkit.models.tokenizer import train_tokenizer
    from rlhfkit.tasks.top5 import format_list

    texts = [f"Top 5 films?\n{format_list(['Alien', 'Heat', 'Up', 'Jaws', 'Big'])}"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300)
    run_dir = tmp_path / "run"
    model = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    save_model(model, tokenizer, run_dir / "sft" / "model")
    args = ["feedback", "simulate", "--out", str(run_dir), "--set", "feedback.n_prompts=6"]
    result = _run(*args, "--set", "feedback.max_new_tokens=4")
    assert result.exit_code == 0, result.output
    assert "feedback samples" in result.output and "12/12" in result.output
    assert "feedback labels" in result.output and "18/18" in result.output
    quiet = _run(*args, "--set", "feedback.max_new_tokens=5", "--no-progress")
    assert quiet.exit_code == 0 and "feedback samples" not in quiet.output


def test_a_boolean_for_a_number_is_refused(tmp_path):
    # YAML reads yes/on/true as booleans; pydantic would have taken them as 1.
    for text in ("seed=yes", "ppo.kl_coef=true", "ppo.kl_target=on"):
        result = _run("config", "show", "--set", text)
        key = text.split("=")[0]
        assert result.exit_code == 2
        assert f"{key}: expected a number, got true (from --set {text})" in _flat(result.output)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: no\n")
    result = _run("config", "show", "-c", str(cfg))
    assert result.exit_code == 2 and "seed: expected a number, got false" in _flat(result.output)
    assert _run("config", "show", "--set", "ppo.reward_norm=true", "--set", "ppo.lr=1e-4").exit_code == 0


def test_a_seed_out_of_range_is_refused(tmp_path):
    # Negative seeds, and seeds numpy's 32-bit legacy seeding cannot take, are named up front.
    rule = "seed: must be 0 or more and below 2**32 (4294967296)"
    for value in ("-1", "-42", "4294967296"):
        result = _run("config", "show", "--set", f"seed={value}")
        assert result.exit_code == 2
        out = _flat(result.output)
        assert f"{rule}, got {value} (from --set seed={value})" in out
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: -3\n")
    result = _run("config", "show", "-c", str(cfg))
    assert result.exit_code == 2 and f"{rule}, got -3" in _flat(result.output)
    assert _run("config", "show", "--set", "seed=0").exit_code == 0
    assert _run("config", "show", "--set", "seed=4294967295").exit_code == 0


@pytest.fixture(scope="module")
def gpt2_run_template(tmp_path_factory):
    """A run whose sft and rm models are a tiny GPT-2 with 32 learned positions, and data files
    whose texts are longer than that."""
    from rlhfkit.models.loading import save_model, tiny_causal_lm
    from rlhfkit.models.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("gpt2-run")
    long = "red blue green yellow, a colour is red or blue; say a colour number 3. " * 3
    tokenizer = train_tokenizer([long] * 50, vocab_size=300)
    model = root / "gpt2"
    save_model(tiny_causal_lm(tokenizer, "gpt2", 32, 1, 2, 64, max_positions=32), tokenizer, model)
    run = root / "run"
    for stage in ("sft", "rm"):
        shutil.copytree(model, run / stage / "model")
    prompts = [f"Say a colour number {i}." for i in range(4)]
    files = {
        "demonstrations": [{"prompt": p, "completion": long} for p in prompts],
        "preferences": [{"prompt": p, "chosen": long, "rejected": "red " + long} for p in prompts],
        "prompts": [{"prompt": p} for p in prompts],
        "heldout_prompts": [{"prompt": p} for p in prompts],
    }
    sets = [f"model.name_or_path={model}"]
    for key, rows in files.items():
        path = root / f"{key}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        sets.append(f"data.{key}={path}")
    return run, sets


@pytest.mark.parametrize(
    "stage, key",
    [
        ("sft", "sft.max_length=64"),
        ("rm", "rm.max_length=64"),
        ("dpo", "dpo.max_length=64"),
        ("kto", "kto.max_length=64"),
        ("ppo", "ppo.max_new_tokens=40"),
        ("grpo", "grpo.max_new_tokens=40"),
        ("rloo", "rloo.max_new_tokens=40"),
        ("bon", "eval.max_new_tokens=40"),
        ("expert_iter", "expert_iter.max_new_tokens=40"),
        ("eval", "eval.max_new_tokens=40"),
    ],
)
def test_lengths_beyond_learned_positions_are_refused_at_the_start(gpt2_run_template, tmp_path, stage, key):
    template, sets = gpt2_run_template
    run = tmp_path / "run"
    shutil.copytree(template, run)
    shutil.rmtree(run / stage, ignore_errors=True)  # sft and rm: the stage's own model is not there
    args = [stage, "--out", str(run), "--no-progress", "--set", key]
    for value in sets:
        args += ["--set", value]
    result = _run(*args)
    assert result.exit_code != 0
    out = _flat(result.output)
    assert f"{key} " in out and "the 32 positions of the learned position embeddings" in out, out
    assert "(gpt2, n_positions)" in out and "Traceback" not in out
    # Refused before any work: the stage wrote nothing, not even an empty folder.
    assert not (run / stage).exists()


@pytest.mark.parametrize(
    "stage, key",
    [
        ("grpo", "grpo.max_new_tokens=40"),
        ("rloo", "rloo.max_new_tokens=40"),
        ("bon", "eval.max_new_tokens=40"),
        ("expert_iter", "expert_iter.max_new_tokens=40"),
    ],
)
def test_critic_free_lengths_are_refused_before_the_reward_model_loads(
    gpt2_run_template, tmp_path, monkeypatch, stage, key
):
    import rlhfkit.train.rewards as rewards

    def no_loading(*args, **kwargs):
        raise AssertionError("the reward model was loaded before the lengths were checked")

    monkeypatch.setattr(rewards, "load_reward_model", no_loading)
    template, sets = gpt2_run_template
    run = tmp_path / "run"
    shutil.copytree(template, run)
    args = [stage, "--out", str(run), "--no-progress", "--set", key]
    for value in sets:
        args += ["--set", value]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    out = _flat(result.output)
    assert f"{key} " in out and "the 32 positions of the learned position embeddings" in out, out


def test_a_db_that_is_not_a_feedback_database_is_refused_and_left_as_it_was(tmp_path):
    # SQLite takes a short file of any text for an empty database and writes its tables into it.
    notes = tmp_path / "notes.txt"
    notes.write_text("x\n")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    pairs = tmp_path / "items.jsonl"
    pairs.write_text('{"prompt": "q", "completions": ["a", "b"]}\n')
    reading = (
        ["export", "--project", "p", "--out", str(tmp_path / "x.jsonl")],
        ["aggregate", "--project", "p", "--out", str(tmp_path / "x.jsonl")],
        ["quality", "--project", "p"],
    )
    writing = (["import", "--project", "p", "--file", str(pairs)],)
    for command in (*reading, *writing):
        result = _run("feedback", command[0], "--db", str(notes), *command[1:])
        assert result.exit_code == 2, result.output
        assert (
            f"--db '{notes}': cannot open the feedback database: {notes} is not an SQLite database"
            in _flat(result.output)
        )
        assert notes.read_text() == "x\n"
    for command in reading:
        result = _run("feedback", command[0], "--db", str(empty), *command[1:])
        assert result.exit_code == 2, result.output
        assert f"{empty} is an empty file, not a feedback database" in _flat(result.output)
        assert empty.read_bytes() == b""
    # An empty file is a new database to a command that writes, as SQLite has it.
    result = _run("feedback", "import", "--db", str(empty), "--project", "p", "--file", str(pairs))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def labelled_db(tmp_path_factory):
    """A comparison project 'crowd' that the crowd10 pool (spammers among them) labelled three times."""
    import random

    from rlhfkit.crowd.simulate import load_pool, simulate_annotation
    from rlhfkit.feedback.store import FeedbackStore

    path = tmp_path_factory.mktemp("labelled") / "crowd.db"
    rng = random.Random(0)
    items = [
        {"prompt": f"q{i}", "responses": [f"first {rng.random():.3f}", f"second {rng.random():.3f}"]}
        for i in range(40)
    ]
    with FeedbackStore(path, seed=0, durable=False) as store:
        project = store.create_project("crowd", task_type="comparison", overlap=3)
        store.add_items(project, items)
        simulate_annotation(store, project, load_pool("crowd10"), lambda _p, text: float(text.split()[-1]), 0)
    return path


def test_an_output_path_under_a_file_is_refused_before_any_work(labelled_db, tmp_path):
    from rlhfkit.feedback.store import FeedbackStore

    db = tmp_path / "crowd.db"
    shutil.copy(labelled_db, db)
    afile = tmp_path / "afile"
    afile.write_text("x")
    target = afile / "out.jsonl"
    hh = tmp_path / "hh.jsonl"
    hh.write_text(
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"})
    )
    for args in (
        ["convert", "--from", "hh", "--in", str(hh)],
        ["feedback", "export", "--db", str(db), "--project", "crowd"],
        ["feedback", "aggregate", "--db", str(db), "--project", "crowd"],
    ):
        result = _run(*args, "--out", str(target))
        assert result.exit_code == 2, result.output
        assert f"--out {target}: {afile} is a file, not a folder" in _flat(result.output)
    # quality --json: refused before --exclude-flagged changes the store.
    quality = ["feedback", "quality", "--db", str(db), "--project", "crowd", "--exclude-flagged"]
    result = _run(*quality, "--json", str(target))
    assert result.exit_code == 2 and f"--json {target}: {afile} is a file, not a folder" in _flat(
        result.output
    )
    with FeedbackStore(db) as store:
        assert store.excluded_annotators() == []
    assert afile.read_text() == "x"
    # A folder not there yet is made, as --out's of export and aggregate are.
    made = tmp_path / "new" / "quality.json"
    result = _run(*quality, "--json", str(made))
    assert result.exit_code == 0, result.output
    assert json.loads(made.read_text())["project"] == "crowd"


def test_compare_with_no_methods_is_refused(tmp_path):
    # It ran every upstream stage and then compared SFT with nothing; the missing model makes the
    # old behaviour fail fast here instead of training.
    for algos in ("", ",", " , "):
        result = _run(
            "compare",
            "--algos",
            algos,
            "--out",
            str(tmp_path / "run"),
            "--set",
            f"model.name_or_path={tmp_path}/x",
        )
        assert result.exit_code == 2
        assert "--algos is empty: give methods to compare with SFT, comma-separated" in _flat(result.output)
    assert not (tmp_path / "run").exists()


def test_guidelines_that_are_not_text_are_named(tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "q", "completions": ["a", "b"]}\n')
    guide = tmp_path / "guide.md"
    guide.write_bytes(b"\xff\xfe# rules\n")
    db = tmp_path / "f.db"
    args = ["feedback", "import", "--db", str(db), "--project", "p", "--file", str(items)]
    result = _run(*args, "--guidelines", str(guide))
    assert result.exit_code == 2
    assert f"--guidelines {guide}: not UTF-8 text (byte 0" in _flat(result.output)
    result = _run(*args, "--guidelines", str(tmp_path))
    assert result.exit_code == 2 and f"--guidelines {tmp_path}: a directory, not a file" in _flat(
        result.output
    )


def test_feedback_serve_passes_trusted_proxies_and_leaves_forwarded_headers_to_the_app(tmp_path, monkeypatch):
    # Only the app decides whose X-Forwarded-For to believe: uvicorn's own default believes any
    # client on 127.0.0.1, which would let a local client pick its address for the login limits.
    import uvicorn

    from rlhfkit.feedback import app as app_module

    seen: dict = {}
    real_create_app = app_module.create_app

    def create_app(store, **kwargs):
        seen["trusted_proxies"] = list(kwargs.get("trusted_proxies", ()))
        return real_create_app(store, **kwargs)

    monkeypatch.setattr(app_module, "create_app", create_app)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(run=kwargs))
    db = tmp_path / "f.db"
    args = ["feedback", "serve", "--db", str(db)]
    args += ["--trusted-proxy", "10.0.0.5", "--trusted-proxy", "10.1.0.0/16"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["trusted_proxies"] == ["10.0.0.5", "10.1.0.0/16"]
    assert seen["run"]["proxy_headers"] is False
    # A bad entry is named, and the service does not start.
    seen.clear()
    result = CliRunner().invoke(app, ["feedback", "serve", "--db", str(db), "--trusted-proxy", "proxy.local"])
    assert result.exit_code == 2
    assert "--trusted-proxy" in result.output and "proxy.local" in result.output and "run" not in seen
