"""Losses, KL estimators and advantages against hand-computed values."""

import math

import pytest
import torch

from rlhfkit.algos.bon import best_of_n_kl
from rlhfkit.algos.kl import kl_estimate
from rlhfkit.algos.masked import masked_mean, masked_var, masked_whiten
from rlhfkit.algos.ppo import gae, kl_penalised_rewards, policy_loss, value_loss
from rlhfkit.algos.reward import bradley_terry_loss
from rlhfkit.algos.sft import completion_nll


def test_bradley_terry_is_ln2_when_rewards_equal():
    r = torch.tensor([0.3, -1.2, 5.0])
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2), abs=1e-7)


def test_bradley_terry_known_value_and_margin():
    # -log sigmoid(2) = log(1 + e^-2)
    loss = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)
    with_margin = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2.0]))
    assert with_margin.item() == pytest.approx(math.log(2), abs=1e-6)


def test_bradley_terry_finite_on_extreme_rewards():
    loss = bradley_terry_loss(torch.tensor([-800.0]), torch.tensor([800.0]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1600.0)


def test_masked_stats_equal_unmasked_elements():
    torch.manual_seed(0)
    x = torch.randn(4, 7)
    mask = (torch.rand(4, 7) > 0.4).float()
    valid = x[mask.bool()]
    assert masked_mean(x, mask).item() == pytest.approx(valid.mean().item(), abs=1e-6)
    assert masked_var(x, mask).item() == pytest.approx(valid.var().item(), abs=1e-6)
    w = masked_whiten(x, mask)
    expected = (valid - valid.mean()) / torch.sqrt(valid.var() + 1e-8)
    assert torch.allclose(w[mask.bool()], expected, atol=1e-5)
    assert torch.all(w[~mask.bool()] == 0)


def test_kl_estimators_on_known_distributions():
    # Sample tokens from p and estimate KL(p || q) for two categoricals with a known KL.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = (p * (p / q).log()).sum().item()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, logq = p.log()[tokens], q.log()[tokens]
    k1 = kl_estimate(logp, logq, "k1").mean().item()
    k3 = kl_estimate(logp, logq, "k3").mean().item()
    k2 = kl_estimate(logp, logq, "k2").mean().item()
    assert k1 == pytest.approx(true_kl, abs=0.01)
    assert k3 == pytest.approx(true_kl, abs=0.01)
    # k2 is biased; its expectation is E_p[(log p/q)^2] / 2, computed exactly here.
    assert k2 == pytest.approx(0.5 * (p * (p / q).log() ** 2).sum().item(), abs=0.01)
    # Per-token values on one hand-checked token: log p - log q = log(0.5/0.2).
    lr = math.log(0.5 / 0.2)
    one = kl_estimate(p.log()[:1], q.log()[:1], "k3").item()
    assert one == pytest.approx((0.2 / 0.5 - 1) + lr, abs=1e-6)
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, logq, "k4")


def test_kl_penalty_vector():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0]]))
    # -0.1 * kl per token, score 2.0 on the last valid token (index 2), nothing on padding.
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0]]))


def test_gae_hand_computed():
    values = torch.tensor([[0.5, 1.0, 2.0, 9.0]])
    rewards = torch.tensor([[0.0, 1.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(values, rewards, mask, gamma=0.9, lam=0.8)
    # Backwards, ignoring the padded 4th token (value after the end is 0):
    d2 = 3.0 + 0.9 * 0.0 - 2.0  # 1.0
    d1 = 1.0 + 0.9 * 2.0 - 1.0  # 1.8
    d0 = 0.0 + 0.9 * 1.0 - 0.5  # 0.4
    a2 = d2
    a1 = d1 + 0.9 * 0.8 * a2
    a0 = d0 + 0.9 * 0.8 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 2.0, 0.0]]), atol=1e-6)


def test_ppo_clipped_loss_hand_computed():
    old = torch.zeros(1, 3)
    # ratios e^0.5 = 1.6487 (clipped to 1.2), e^-0.5 = 0.6065 (clipped to 0.8), 1.0
    new = torch.tensor([[0.5, -0.5, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(new, old, adv, mask, clip_eps=0.2)
    # token 0: max(-1.6487, -1.2) = -1.2 (clipped); token 1: max(-0.6065, -0.8) = -0.6065;
    # token 2: max(2.0, 2.0) = 2.0
    expected = (-1.2 - math.exp(-0.5) + 2.0) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert stats["clipfrac"] == pytest.approx(1 / 3)


def test_value_loss_clipping():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2, abs=1e-6)
    assert stats["vf_clipfrac"] == pytest.approx(0.5)


def test_completion_nll_ignores_prompt_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])
    lp = torch.log_softmax(logits, -1)
    expected = -(lp[0, 1, 3] + lp[0, 2, 4]) / 2
    assert completion_nll(logits, ids, mask).item() == pytest.approx(expected.item(), abs=1e-6)


def test_krippendorff_alpha_hand_computed():
    from rlhfkit.crowd.agreement import krippendorff_alpha_nominal

    # o_aa = 2, o_ab = o_ba = 1, n_a = 3, n_b = 1, n = 4: alpha = 1 - 3 * 2 / (2 * 3 * 1) = 0
    assert krippendorff_alpha_nominal({1: ["a", "a"], 2: ["a", "b"]}) == pytest.approx(0.0)
    assert krippendorff_alpha_nominal({1: ["a", "a"], 2: ["b", "b", "b"]}) == pytest.approx(1.0)
    # Systematic disagreement is below chance.
    assert krippendorff_alpha_nominal({1: ["a", "b"], 2: ["b", "a"]}) < 0
    assert krippendorff_alpha_nominal({1: ["a"], 2: ["a", "a"]}) is None


def test_best_of_n_kl_matches_formula_and_edges() -> None:
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(256) == pytest.approx(math.log(256) - 255 / 256)
    with pytest.raises(ValueError, match="n must be"):
        best_of_n_kl(0)
