"""Tests for how `rlhfkit eval` finds policies and references (no models loaded)."""

from pathlib import Path

import pytest

from rlhfkit.eval.evaluate import model_label, reference_policy, resolve_policies, topic_references


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_default_policies_are_sft_then_trained_stages(tmp_path):
    for stage in ("pretrain", "rm", "sft", "ppo", "dpo"):
        _model(tmp_path / stage / "model")
    assert list(resolve_policies(tmp_path, [])) == ["sft", "dpo", "ppo"]


def test_named_stages_and_folders(tmp_path):
    _model(tmp_path / "sft" / "model")
    ckpt = _model(tmp_path / "ppo" / "checkpoints" / "step-40")
    policies = resolve_policies(tmp_path, ["sft", str(ckpt)])
    assert policies == {"sft": tmp_path / "sft" / "model", "checkpoints/step-40": ckpt}


def test_unknown_policy_names_both_places(tmp_path):
    with pytest.raises(ValueError, match=r"policy 'ppo': neither .*ppo/model nor ppo holds a saved model"):
        resolve_policies(tmp_path, ["ppo"])


def test_model_label_skips_a_final_model_folder(tmp_path):
    assert model_label(tmp_path / "small" / "rm" / "model") == "small/rm"
    assert model_label(tmp_path / "ppo" / "checkpoints" / "step-5") == "checkpoints/step-5"


def test_topic_references_are_demonstrations_of_the_same_topic():
    topic_of = {"films?": "film", "best films": "film", "plants?": "plant"}.get
    demos = [{"prompt": "best films", "completion": "1. Heat"}, {"prompt": "other", "completion": "x"}]
    assert topic_references(["films?", "plants?", "zzz"], demos, topic_of) == [["1. Heat"], [], []]


def test_folders_that_share_a_label_are_both_kept(tmp_path):
    # Two runs' step-2 are both "checkpoints/step-2": the second silently replaced the first,
    # so one policy was judged and reported under a name that stood for two. Now every folder
    # is named by its full path when two labels collide.
    _model(tmp_path / "sft" / "model")
    a = _model(tmp_path / "a" / "ppo" / "checkpoints" / "step-2")
    b = _model(tmp_path / "b" / "ppo" / "checkpoints" / "step-2")
    policies = resolve_policies(tmp_path, ["sft", str(a), str(b)])
    assert policies == {"sft": tmp_path / "sft" / "model", str(a.resolve()): a, str(b.resolve()): b}
    # The same folder twice is one policy, under its short label.
    same = resolve_policies(tmp_path, ["sft", str(a), str(a)])
    assert same == {"sft": tmp_path / "sft" / "model", "checkpoints/step-2": a}


def test_policies_keep_the_order_given(tmp_path):
    # The first policy is the default reference.
    _model(tmp_path / "sft" / "model")
    ckpt = _model(tmp_path / "ppo" / "checkpoints" / "step-40")
    assert list(resolve_policies(tmp_path, [str(ckpt), "sft"])) == ["checkpoints/step-40", "sft"]


def test_evaluate_refuses_a_temperature_with_no_kl(tmp_path):
    # At temperature 0 (greedy) the log-probs divide the logits by 0: every KL came out NaN.
    from rlhfkit.eval.evaluate import evaluate_policies

    policies = {"sft": tmp_path / "sft", "ppo": tmp_path / "ppo"}
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eval.temperature must be > 0"):
            evaluate_policies(
                policies,
                "sft",
                None,
                ["p"],
                lambda p, r: 0.0,
                seed=0,
                temperature=temperature,
                max_new_tokens=4,
            )


def test_reference_given_as_a_folder_is_that_policys_label(tmp_path):
    # --reference PATH with PATH one of the --policies folders was "not among the policies":
    # policies are named by label, and the reference was looked up as given.
    _model(tmp_path / "sft" / "model")
    ckpt = _model(tmp_path / "ppo" / "checkpoints" / "step-40")
    policies = resolve_policies(tmp_path, ["sft", str(ckpt)])
    assert reference_policy(tmp_path, policies, str(ckpt)) == "checkpoints/step-40"
    assert reference_policy(tmp_path, policies, str(ckpt) + "/") == "checkpoints/step-40"
    assert reference_policy(tmp_path, policies, "checkpoints/step-40") == "checkpoints/step-40"
    assert reference_policy(tmp_path, policies, "sft") == "sft"
    # A stage's model folder given by path is that stage.
    assert reference_policy(tmp_path, policies, str(tmp_path / "sft" / "model")) == "sft"
    # Two folders named by full path: each path given finds its own.
    a = _model(tmp_path / "a" / "checkpoints" / "step-2")
    b = _model(tmp_path / "b" / "checkpoints" / "step-2")
    both = resolve_policies(tmp_path, ["sft", str(a), str(b)])
    assert reference_policy(tmp_path, both, str(b)) == str(b.resolve())
    # Anything else is left as given, for evaluate_policies to name as missing.
    assert reference_policy(tmp_path, policies, "dpo") == "dpo"
