"""Losses, KL estimators and advantages against hand-computed values."""

import math

import pytest
import torch

from rlhfkit.algos.bon import best_of_n_kl
from rlhfkit.algos.kl import kl_estimate
from rlhfkit.algos.masked import masked_mean, masked_var, masked_whiten
from rlhfkit.algos.ppo import (
    a2c_policy_loss,
    adaptive_kl_coef,
    gae,
    kl_loss,
    kl_penalised_rewards,
    policy_loss,
    process_scores,
    reward_normalisation,
    running_moments_update,
    value_loss,
)
from rlhfkit.algos.reward import bradley_terry_loss, pair_correct, pairwise_accuracy
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


def test_pair_accuracy_counts_a_tied_reward_as_half_correct():
    chosen = torch.tensor([2.0, 0.5, -1.0, 3.0])
    rejected = torch.tensor([1.0, 0.5, 0.0, 3.0])
    assert pair_correct(chosen, rejected).tolist() == [1.0, 0.5, 0.0, 0.5]
    assert pairwise_accuracy(chosen, rejected) == pytest.approx(0.5)
    # At initialisation every pair ties: chance, not zero.
    zeros = torch.zeros(5)
    assert pairwise_accuracy(zeros, zeros) == pytest.approx(0.5)
    assert pair_correct(zeros.double(), zeros.double()).dtype == torch.float64


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


def test_value_loss_counts_no_clipping_inside_the_range():
    # |V - V_old| = 0.06 < 0.2, but V_old + (V - V_old) rounds to one ulp further from the return
    # than V in float32, which made the clipped term the larger one (counted clipped before).
    values, old = torch.tensor([[-0.055619169026613235]]), torch.tensor([[0.004993150010704994]])
    returns = torch.tensor([[0.0332]])
    assert (old + (values - old) - returns).abs() > (values - returns).abs()  # the rounding itself
    loss, stats = value_loss(values, old, returns, torch.ones(1, 1), clip_range=0.2)
    assert stats["vf_clipfrac"] == 0.0
    assert loss.item() == pytest.approx(0.5 * (values - returns).item() ** 2, rel=1e-6)


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


def test_dual_clip_caps_negative_advantage_tokens():
    old = torch.zeros(1, 2)
    # ratio e^2 = 7.389 on a token with A = -1: PPO's loss is max(7.389, 1.2) = 7.389;
    # dual clip c = 3 caps it at -c * A = 3. The positive-advantage token is unchanged.
    new = torch.tensor([[2.0, 2.0]])
    adv = torch.tensor([[-1.0, 1.0]])
    mask = torch.ones(1, 2)
    plain, _ = policy_loss(new, old, adv, mask, clip_eps=0.2)
    dual, _ = policy_loss(new, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    assert plain.item() == pytest.approx((math.exp(2.0) - 1.2) / 2, abs=1e-5)
    assert dual.item() == pytest.approx((3.0 - 1.2) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(new, old, adv, mask, dual_clip=1.0)


def test_a2c_loss_is_advantage_weighted_log_likelihood():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = a2c_policy_loss(logp, adv, mask)
    assert loss.item() == pytest.approx(-(0.5 * -1.0 + -1.0 * -2.0) / 2)
    loss.backward()
    # The gradient is -A / n on valid tokens: the same as PPO's at ratio 1.
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, 0.5, 0.0]]))
    ppo_logp = logp.detach().clone().requires_grad_(True)
    policy_loss(ppo_logp, logp.detach(), adv, mask)[0].backward()
    assert torch.allclose(ppo_logp.grad, logp.grad)


def test_token_sum_normalisation_makes_accumulation_equal_one_batch():
    torch.manual_seed(0)
    logp = torch.randn(4, 5, requires_grad=True)
    old, adv = torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).float()
    full, _ = policy_loss(logp, old, adv, mask)
    (g_full,) = torch.autograd.grad(full, logp)
    n = mask.sum().item()
    parts = [
        policy_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], n_tokens=n)[0]
        for i in (0, 2)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), abs=1e-6)
    (g_acc,) = torch.autograd.grad(sum(parts), logp)
    assert torch.allclose(g_acc, g_full, atol=1e-7)


def test_value_loss_without_clipping_is_half_squared_error():
    values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    loss, stats = value_loss(values, torch.zeros(1, 2), returns, torch.ones(1, 2), clip_range=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert stats["vf_clipfrac"] == 0.0


def test_kl_loss_is_differentiable_k3_mean():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0]])
    loss = kl_loss(logp, ref, torch.ones(1, 2), "k3")
    # k3 at log r = -0.5: e^-0.5 - 1 + 0.5; at log r = 0: 0
    assert loss.item() == pytest.approx((math.exp(-0.5) - 0.5) / 2, abs=1e-6)
    loss.backward()
    # d/dlogp [e^(ref - logp) - 1 - (ref - logp)] = 1 - e^(ref - logp)
    assert logp.grad[0, 0].item() == pytest.approx((1 - math.exp(-0.5)) / 2, abs=1e-6)


def test_adaptive_kl_controller_hand_computed():
    # KL twice the target: error clipped to +0.2; beta *= 1 + 0.2 * 64 / 10000
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    # KL 10% under target: error -0.1
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 100, 10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 100, 10) == pytest.approx(0.1)


def test_process_scores_normalises_penalises_and_clips():
    raw = torch.tensor([1.0, 3.0, 5.0, 7.0])
    gain, bias = reward_normalisation(raw)
    normed = process_scores(raw, gain=gain, bias=bias)
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert normed.std().item() == pytest.approx(1.0, abs=1e-6)
    has_eos = torch.tensor([True, False, True, False])
    out = process_scores(raw, has_eos=has_eos, missing_eos_penalty=2.0, clip=4.0)
    assert out.tolist() == [1.0, 1.0, 4.0, 4.0]  # 3-2, 5 clipped, 7-2=5 clipped
    with pytest.raises(ValueError, match="has_eos"):
        process_scores(raw, missing_eos_penalty=1.0)


def test_running_moments_equal_batch_statistics():
    torch.manual_seed(0)
    x = torch.randn(100) * 3 + 2
    state = (0.0, 1.0, 0)
    for chunk in x.split(17):
        state = running_moments_update(state, chunk)
    assert state[0] == pytest.approx(x.mean().item(), abs=1e-5)
    assert state[1] == pytest.approx(x.var(unbiased=False).item(), abs=1e-4)
    assert state[2] == 100
