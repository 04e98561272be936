"""Bad input at the command line fails with a message that names what is wrong, exit code != 0."""

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
    db = f"sqlite:///{tmp_path / 'f.db'}"
    result = _run("feedback", "export", "--db", db, "--project", "nope", "--out", str(tmp_path / "x.jsonl"))
    assert result.exit_code != 0 and "nope" in _flat(result.output)
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
