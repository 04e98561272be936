"""Tests for rlhfkit.eval.overopt: the best-of-n estimator, analytic KL, and the Gao et al. fits."""

import itertools
import math

import numpy as np
import pytest

from rlhfkit.algos.bon import best_of_n_kl
from rlhfkit.eval.evaluate import model_label
from rlhfkit.eval.overopt import (
    best_of_n_expectation,
    best_of_n_weights,
    bon_sweep,
    checkpoint_paths,
    fit_gao,
    reward_model_paths,
    rl_sweep,
    run_overopt,
    summary_rows,
)


def test_weights_hand_computed():
    # N = 3, n = 2: the i-th smallest is the max of a random pair with prob C(i-1, 1) / C(3, 2).
    assert best_of_n_weights(3, 2) == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert best_of_n_weights(4, 1) == pytest.approx([0.25] * 4)
    assert best_of_n_weights(4, 4) == pytest.approx([0, 0, 0, 1])
    # Large N stays finite (C(256, 128) overflows a float).
    assert best_of_n_weights(256, 128).sum() == pytest.approx(1.0)


def test_expectation_matches_enumeration():
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=7), rng.normal(size=7)
    for n in (1, 3, 5, 7):
        subsets = list(itertools.combinations(range(7), n))
        exact = np.mean([gold[max(s, key=lambda i: proxy[i])] for s in subsets])
        assert best_of_n_expectation(proxy, gold, n) == pytest.approx(exact)
    with pytest.raises(ValueError, match="n=8"):
        best_of_n_weights(7, 8)


def test_analytic_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(256) == pytest.approx(math.log(256) - 255 / 256)


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_fit_recovers_known_parameters(form):
    a, b = 1.3, 0.45
    d = np.linspace(0.0, 3.0, 15)
    second = d * d if form == "bon" else d * np.log(np.where(d > 0, d, 1.0))
    exact = a * d - b * second
    fit = fit_gao(d, exact, form)
    assert (fit["a"], fit["b"], fit["r2"]) == pytest.approx((a, b, 1.0), abs=1e-9)
    noisy = exact + np.random.default_rng(1).normal(scale=0.02, size=d.size)
    fit = fit_gao(d, noisy, form)
    assert fit["a"] == pytest.approx(a, abs=0.08) and fit["b"] == pytest.approx(b, abs=0.08)
    assert 0.95 < fit["r2"] < 1.0


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        fit_gao([0, 1], [0, 1], "bon")
    with pytest.raises(ValueError, match="'quadratic'"):
        fit_gao([0, 1, 2], [0, 1, 2], "quadratic")


def test_bon_sweep_shows_overoptimisation_on_a_planted_proxy():
    # The proxy rewards length-like x; gold likes x up to a point and then dislikes it.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 64))
    proxy = {"rm": x.tolist()}
    gold = (x - 0.4 * x**2).tolist()
    sweep = bon_sweep(proxy, gold)
    assert sweep["n"][-1] == 64 and sweep["kl"][0] == 0.0
    rm = sweep["rms"]["rm"]
    assert rm["proxy_monotone"] and rm["gold_drop_after_peak"] > 0
    assert 1 < rm["gold_peak_at"] < 64
    assert rm["gold_rel"][0] == 0.0 and rm["fit_gold"]["b"] > 0


def test_rl_sweep_is_relative_to_sft():
    points = [
        {"name": "sft", "kl": 0.0, "gold": 0.2, "proxy/rm": 1.0},
        {"name": "step-1", "kl": 1.0, "gold": 0.4, "proxy/rm": 2.0},
        {"name": "step-2", "kl": 4.0, "gold": 0.3, "proxy/rm": 3.0},
    ]
    sweep = rl_sweep(points, ["rm"])
    assert sweep["sqrt_kl"] == [0.0, 1.0, 2.0]
    assert sweep["gold_rel"] == pytest.approx([0.0, 0.2, 0.1])
    assert sweep["rms"]["rm"]["gold_peak_at"] == "step-1"
    assert sweep["rms"]["rm"]["proxy_rel"] == [0.0, 1.0, 2.0]


def test_summary_rows_print_a_b_and_r2_of_both_fits():
    # docs/evaluation.md: the command prints a, b, R^2 for gold and for proxy.
    x = np.random.default_rng(0).normal(size=(10, 16))
    result = {"bon": bon_sweep({"rm": x.tolist()}, (x - 0.5 * x**2).tolist())}
    (row,) = summary_rows(result)
    rm = result["bon"]["rms"]["rm"]
    for kind in ("gold", "proxy"):
        fit = rm[f"fit_{kind}"]
        assert f"fit {kind} a={fit['a']:.3f} b={fit['b']:.3f} R^2={fit['r2']:.3f}" in row


def test_fit_with_one_distinct_d_is_an_error_not_an_arbitrary_a_b():
    # d = [0, 0, 1.4]: one distinct d > 0 fixes only a - b log 1.4, so any (a, b) on a line fits
    # equally well; lstsq returned one of them (a = 0.19, b = -0.065, R^2 = 0.79) as if measured.
    with pytest.raises(ValueError, match="two distinct d > 0"):
        fit_gao([0.0, 0.0, 1.4], [0.0, 0.1, 0.3], "rl")
    with pytest.raises(ValueError, match="two distinct d > 0"):
        fit_gao([0.0, 1.0, 1.0], [0.0, 0.1, 0.3], "bon")


def test_fit_through_two_points_has_no_r2():
    # SFT plus two checkpoints: a, b go through both points exactly (d = 1: a = 0.2; d = 2:
    # 2 (a - b log 2) = 0.1, b = 0.15 / log 2), so R^2 = 1 says nothing; it is NaN (null in JSON).
    fit = fit_gao([0.0, 1.0, 2.0], [0.0, 0.2, 0.1], "rl")
    assert (fit["a"], fit["b"]) == pytest.approx((0.2, 0.15 / math.log(2)))
    assert math.isnan(fit["r2"])
    # Three points past d = 0 leave one residual degree of freedom: R^2 is a number again.
    assert not math.isnan(fit_gao([0.0, 1.0, 2.0, 3.0], [0.0, 0.2, 0.1, 0.0], "rl")["r2"])


def test_rl_sweep_with_checkpoints_at_d_zero_skips_the_fit_and_says_why():
    # A checkpoint's sampled k1 can be negative: it sits at d = 0 with SFT, one d > 0 is left.
    points = [
        {"name": "sft", "kl": 0.0, "gold": 0.2, "proxy/rm": 1.0},
        {"name": "step-1", "kl": -0.2, "gold": 0.3, "proxy/rm": 1.5},
        {"name": "step-2", "kl": 2.0, "gold": 0.1, "proxy/rm": 3.0},
    ]
    sweep = rl_sweep(points, ["rm"])
    assert "fit_gold" not in sweep and "fit_proxy" not in sweep["rms"]["rm"]
    assert "two distinct d > 0" in sweep["fit_skipped"]
    (row,) = summary_rows({"rl": sweep})
    assert "no fit: a and b are not identifiable" in row


def test_bon_sweep_of_three_samples_fits_without_r2():
    # n = 1, 2, 3: two points past SFT, an exact fit; R^2 is null, not 1.
    x = np.random.default_rng(0).normal(size=(5, 3))
    rm = bon_sweep({"rm": x.tolist()}, x.tolist())["rms"]["rm"]
    assert math.isnan(rm["fit_gold"]["r2"]) and math.isnan(rm["fit_proxy"]["r2"])


def _saved(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_extra_reward_models_that_share_a_label_are_all_kept(tmp_path):
    # Two runs' rm/model are both "<run>/rm" when the runs share a folder name, and a folder
    # labelled "rm" would take the run's own proxy RM's place: none may replace another.
    own = _saved(tmp_path / "run" / "rm" / "model")
    a = _saved(tmp_path / "a" / "small" / "rm" / "model")
    b = _saved(tmp_path / "b" / "small" / "rm" / "model")
    paths = reward_model_paths(own, [a, b])
    assert paths == {"rm": own, str(a.resolve()): a, str(b.resolve()): b}
    # Distinct labels stay short, and the same folder twice is one reward model.
    assert reward_model_paths(own, [a, a]) == {"rm": own, "small/rm": a}
    named_rm = _saved(tmp_path / "rm")  # model_label is "<tmp>/rm", not "rm"; full paths only on a clash
    assert list(reward_model_paths(own, [named_rm])) == ["rm", model_label(named_rm)]


def test_extra_reward_model_without_a_saved_model_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"--rm .*: no saved model \(config.json\) there"):
        reward_model_paths(_saved(tmp_path / "rm" / "model"), [tmp_path / "empty"])


def test_checkpoints_are_named_as_eval_names_policy_folders(tmp_path):
    from rlhfkit.eval.evaluate import folder_labels

    a = _saved(tmp_path / "a" / "ppo" / "checkpoints" / "step-20")
    b = _saved(tmp_path / "b" / "ppo" / "checkpoints" / "step-20")
    c = _saved(tmp_path / "a" / "ppo" / "checkpoints" / "step-40")
    # Two runs' step-20: both kept, each by its full path, as `rlhfkit eval --policies` names them.
    both = checkpoint_paths([a, b])
    assert both == {str(a.resolve()): a, str(b.resolve()): b}
    assert set(both) == set(folder_labels([a, b]).values())
    # Distinct folders keep eval's short labels; the same folder twice is one checkpoint.
    assert checkpoint_paths([a, c, a]) == {"checkpoints/step-20": a, "checkpoints/step-40": c}
    assert list(checkpoint_paths([a, c])) == [folder_labels([a, c])[p.resolve()] for p in (a, c)]
    # A folder labelled like the SFT point may not take its place.
    sft_like = _saved(tmp_path / "x" / "sft")
    assert model_label(sft_like) == "x/sft" and list(checkpoint_paths([sft_like])) == ["x/sft"]


def test_checkpoint_without_a_saved_model_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"--checkpoint .*empty: no saved model \(config.json\) there"):
        checkpoint_paths([tmp_path / "empty"])


@pytest.fixture(scope="module")
def gpt2_32(tmp_path_factory):
    """A tiny GPT-2 (policy and reward model alike) with 32 learned positions."""
    from rlhfkit.models.loading import save_model, tiny_causal_lm
    from rlhfkit.models.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["red blue green, say a colour number 3."] * 50, vocab_size=300)
    folder = tmp_path_factory.mktemp("gpt2-32") / "model"
    save_model(tiny_causal_lm(tokenizer, "gpt2", 32, 1, 2, 64, max_positions=32), tokenizer, folder)
    return folder


def test_overopt_refuses_responses_beyond_the_learned_positions_before_any_work(gpt2_32, tmp_path):
    out = tmp_path / "overopt"
    with pytest.raises(ValueError) as info:
        run_overopt(
            out,
            gpt2_32,
            {"rm": gpt2_32},
            {},
            ["Say a colour number 1.", "Say a colour number 2."],
            lambda prompt, response: 0.0,
            samples_per_prompt=2,
            seed=0,
            temperature=1.0,
            max_new_tokens=40,
        )
    message = str(info.value)
    assert "overopt.max_new_tokens=40" in message and "the 32 positions of the learned position" in message
    assert "(gpt2, n_positions)" in message and "lower overopt.max_new_tokens to" in message
    assert not out.exists()
