"""DPO, IPO, KTO, GRPO, RLOO and REINFORCE++ losses against hand-computed values."""

import math

import pytest
import torch

from rlhfkit.algos.bon import best_of_n_kl
from rlhfkit.algos.dpo import dpo_loss, sequence_logprob
from rlhfkit.algos.grpo import (
    aggregate_token_loss,
    clipped_policy_loss,
    group_advantages,
    grpo_loss,
    leave_one_out_baseline,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhfkit.algos.kto import kto_loss, kto_reference_point, mismatched_partners


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# ---- DPO / IPO -------------------------------------------------------------------------------


def test_dpo_is_ln2_when_policy_equals_reference():
    logp = _t(-3.0, -12.5, -0.2)
    loss, stats = dpo_loss(logp, logp - 1.0, logp, logp - 1.0, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["reward/margin"] == pytest.approx(0.0)
    # Every implicit reward ties at initialisation: accuracy at chance, as a tie counts half.
    assert stats["reward/accuracy"] == pytest.approx(0.5)


def test_dpo_sigmoid_and_conservative_hand_computed():
    # margin h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2; beta * h = 1.
    args = (_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0))
    loss, stats = dpo_loss(*args, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert stats["reward/chosen"] == pytest.approx(0.5) and stats["reward/rejected"] == pytest.approx(-0.5)
    assert stats["reward/accuracy"] == 1.0
    smoothed, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert smoothed.item() == pytest.approx(expected, abs=1e-6)


def test_ipo_hand_computed():
    args = (_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0))
    # (h - 1 / (2 beta))^2 = (2 - 1)^2 with beta = 0.5; 1 / (4 beta^2) = 1 at equality.
    loss, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(1.0)
    loss, _ = dpo_loss(*args, beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx((2.0 - 2.0) ** 2)
    equal, _ = dpo_loss(_t(-1.0), _t(-1.0), _t(-1.0), _t(-1.0), beta=0.1, loss_type="ipo")
    assert equal.item() == pytest.approx(1 / (4 * 0.1**2), rel=1e-6)


def test_dpo_finite_and_differentiable_on_extreme_logprobs():
    pc = torch.tensor([-800.0, 800.0], requires_grad=True)
    pr = torch.tensor([800.0, -800.0], requires_grad=True)
    zeros = torch.zeros(2)
    for loss_type, smoothing in (("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)):
        loss, _ = dpo_loss(pc, pr, zeros, zeros, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
        (grad,) = torch.autograd.grad(loss, pc)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Pair 0 is wrong by a margin of 1600: -log sigmoid(-160) = 160.
    loss, _ = dpo_loss(pc[:1], pr[:1], zeros[:1], zeros[:1], beta=0.1)
    assert loss.item() == pytest.approx(160.0)


def test_dpo_rejects_bad_options():
    x = _t(0.0)
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)


def test_sequence_logprob_sums_or_averages_valid_tokens():
    token_logp = torch.tensor([[-1.0, -2.0, -9.0], [-4.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.allclose(sequence_logprob(token_logp, mask), _t(-3.0, -4.0))
    assert torch.allclose(sequence_logprob(token_logp, mask, average=True), _t(-1.5, -4.0))


# ---- KTO -------------------------------------------------------------------------------------


def test_kto_policy_equals_reference_gives_half_the_weights():
    logp = _t(-2.0, -5.0)
    loss, stats = kto_loss(
        logp, logp, torch.tensor([True, False]), logp, logp, desirable_weight=1.0, undesirable_weight=2.0
    )
    # r = 0 and z0 = 0: value = lambda * sigmoid(0) = lambda / 2; mean(1/2, 2/2) = 0.75.
    assert loss.item() == pytest.approx(0.75)
    assert stats["kl_reference_point"] == 0.0


def test_kto_hand_computed_with_reference_point():
    policy, ref = _t(-1.0, -3.0), _t(-2.0, -2.0)  # r = [1, -1]
    kl_policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    kl_ref = _t(-2.0, -2.0)  # mismatched log-ratios [1, 0]: z0 = 0.5
    loss, stats = kto_loss(policy, ref, torch.tensor([True, False]), kl_policy, kl_ref, beta=1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = ((1 - sig(1 - 0.5)) + (1 - sig(0.5 + 1))) / 2
    assert stats["kl_reference_point"] == pytest.approx(0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # The reference point is a detached baseline: no gradient flows into the KL pairs.
    assert not loss.requires_grad or torch.autograd.grad(loss, kl_policy, allow_unused=True)[0] is None


def test_kto_reference_point_is_clamped_at_zero():
    assert kto_reference_point(_t(-3.0, -3.0), _t(-1.0, -1.0)).item() == 0.0


def test_kto_finite_on_extreme_logprobs():
    policy = torch.tensor([-800.0, 800.0, 0.0], requires_grad=True)
    loss, _ = kto_loss(
        policy, -policy.detach(), torch.tensor([True, False, True]), _t(800, -800, 0), _t(0, 0, 0)
    )
    (grad,) = torch.autograd.grad(loss, policy)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_mismatched_partners_never_pair_an_example_with_itself():
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 17):
        partners = mismatched_partners(n, gen)
        assert sorted(partners.tolist()) == list(range(n))
        assert all(partners[i] != i for i in range(n))
    with pytest.raises(ValueError, match="at least 2"):
        mismatched_partners(1)


# ---- GRPO / RLOO / REINFORCE++ ---------------------------------------------------------------


def test_group_advantages_zero_for_equal_rewards_and_hand_computed():
    scores = torch.tensor([[0.7, 0.7, 0.7, 0.7], [1.0, 2.0, 3.0, 2.0]])
    adv = group_advantages(scores, eps=0.0)
    assert torch.all(adv[0] == 0)
    std = torch.tensor([1.0, 2.0, 3.0, 2.0]).std().item()  # unbiased: sqrt(2/3)
    assert torch.allclose(adv[1], torch.tensor([-1.0, 0.0, 1.0, 0.0]) / std)
    # Dr. GRPO: centred only.
    assert torch.allclose(group_advantages(scores, scale=False)[1], _t(-1.0, 0.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_rloo_baseline_excludes_the_sample_itself():
    scores = torch.tensor([[1.0, 2.0, 6.0]])
    assert torch.allclose(leave_one_out_baseline(scores), torch.tensor([[4.0, 3.5, 1.5]]))
    assert torch.allclose(rloo_advantages(scores), torch.tensor([[-3.0, -1.5, 4.5]]))
    # Changing sample 0's own reward leaves its baseline unchanged (and moves everyone else's).
    moved = torch.tensor([[100.0, 2.0, 6.0]])
    assert leave_one_out_baseline(moved)[0, 0] == leave_one_out_baseline(scores)[0, 0]
    assert leave_one_out_baseline(moved)[0, 1] != leave_one_out_baseline(scores)[0, 1]


def test_rloo_advantages_exactly_zero_for_a_tied_group():
    # (sum - r) / (G - 1) rounds away from r in float32 (0.1 with G = 3 gives -7.5e-9): a tied group
    # carries no signal, and a gradient of rounding noise is still a step under Adam.
    for value in (0.1, 0.7, 1 / 3):
        for g in (2, 3, 7, 8):
            scores = torch.full((2, g), value)
            scores[1] = torch.arange(g, dtype=torch.float32)  # an untied group beside it
            adv = rloo_advantages(scores)
            assert torch.all(adv[0] == 0), (value, g)
            assert torch.all(leave_one_out_baseline(scores)[0] == scores[0]), (value, g)
            expected = g / (g - 1) * (scores[1] - scores[1].mean())
            assert torch.allclose(adv[1], expected, atol=1e-6)


def test_reinforce_pp_returns_whitened_over_the_batch():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, kl = reinforce_pp_advantages(_t(2.0, 0.0), logp, ref, mask, kl_coef=0.1)
    # Rewards row 0: [-0.05, 0.1, 2.0] (KL 0.5, -1, 0; score on the last token); returns to go
    # [2.05, 2.1, 2.0]; row 1: [0, 0]. Whitened together with the unbiased batch variance.
    valid = _t(2.05, 2.1, 2.0, 0.0, 0.0)
    expected = (valid - valid.mean()) / torch.sqrt(valid.var() + 1e-8)
    assert torch.allclose(adv[mask.bool()], expected, atol=1e-5)
    assert torch.all(adv[~mask.bool()] == 0)
    assert torch.allclose(kl[0, :3], _t(0.5, -1.0, 0.0))


def test_aggregate_token_loss_normalisations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_token_loss(per_token, mask, "sequence").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_token_loss(per_token, mask, "token").item() == pytest.approx(10.0 / 4)
    assert aggregate_token_loss(per_token, mask, "constant", 4.0).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    with pytest.raises(ValueError, match="normalisation"):
        aggregate_token_loss(per_token, mask, "batch")


def test_aggregate_token_loss_of_blocks_averages_to_the_whole_batch():
    """Two processes' blocks with the batch's counts / 2: their mean (DDP's average) is the batch's loss."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [5.0, 7.0, 0.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    n_rows, n_tokens = 4 / 2, 6 / 2
    for normalisation, whole in [
        ("sequence", (2.0 + 4.0 + 6.0 + 0.0) / 4),
        ("token", (6.0 + 4.0 + 12.0) / 6),  # a per-block token mean would give (10/4 + 12/2) / 2
        ("constant", (6.0 + 4.0 + 12.0) / 3 / 4),
    ]:
        blocks = [
            aggregate_token_loss(per_token[rows], mask[rows], normalisation, 3.0, n_rows, n_tokens)
            for rows in (slice(0, 2), slice(2, 4))
        ]
        assert aggregate_token_loss(per_token, mask, normalisation, 3.0).item() == pytest.approx(whole)
        assert ((blocks[0] + blocks[1]) / 2).item() == pytest.approx(whole), normalisation


def test_clipped_policy_loss_hand_computed():
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.5, -0.5, 0.0]])
    per_token, stats = clipped_policy_loss(new, old, _t(1.0), torch.ones(1, 3), clip_eps=0.2)
    # Sequence advantage 1 on every token: ratio e^0.5 clipped to 1.2, e^-0.5 kept, 1 kept.
    assert torch.allclose(per_token, torch.tensor([[-1.2, -math.exp(-0.5), -1.0]]), atol=1e-6)
    assert stats["clipfrac"] == pytest.approx(1 / 3)


def test_grpo_loss_with_k3_kl_hand_computed():
    mask = torch.tensor([[1, 1], [1, 0]])
    logp = torch.zeros(2, 2)
    ref = torch.full((2, 2), math.log(0.5))
    adv = _t(1.0, 0.5)
    loss, stats = grpo_loss(logp, logp, ref, adv, mask, kl_coef=0.1, normalisation="sequence")
    k3 = (0.5 - 1) - math.log(0.5)  # ratio pi_ref / pi = 0.5 on every token
    # Ratio 1: token loss -A + 0.1 * k3; mean per sequence, then over sequences.
    expected = ((-1.0 + 0.1 * k3) + (-0.5 + 0.1 * k3)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["kl"] == pytest.approx(k3, abs=1e-6)
    # Dr. GRPO: token sums over a constant 4 (row 0 has two tokens, row 1 one).
    dr, _ = grpo_loss(logp, logp, ref, adv, mask, kl_coef=0.1, normalisation="constant", constant=4.0)
    expected_dr = (2 * (-1.0 + 0.1 * k3) / 4 + (-0.5 + 0.1 * k3) / 4) / 2
    assert dr.item() == pytest.approx(expected_dr, abs=1e-6)


def test_critic_free_losses_finite_on_extreme_logprobs():
    logp = torch.tensor([[-800.0, 800.0, 0.0]], requires_grad=True)
    old = torch.tensor([[800.0, -800.0, 0.0]])
    ref = torch.tensor([[0.0, -800.0, 800.0]])
    mask = torch.ones(1, 3)
    loss, _ = grpo_loss(logp, old, ref, _t(1.0), mask)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    adv, kl = reinforce_pp_advantages(
        _t(1.0, 2.0), logp.detach().repeat(2, 1), ref.repeat(2, 1), mask.repeat(2, 1), 0.1
    )
    assert torch.isfinite(adv).all() and torch.isfinite(kl).all()


def test_best_of_n_kl_matches_the_exact_discrete_value():
    # Best-of-n over M equally likely distinct outcomes picks rank k with probability
    # (k/M)^n - ((k-1)/M)^n; its KL to uniform approaches log n - (n-1)/n as M grows.
    m, n = 200_000, 8
    k = torch.arange(1, m + 1, dtype=torch.float64)
    p = (k / m) ** n - ((k - 1) / m) ** n
    exact = (p * torch.log(p * m)).sum().item()
    assert exact == pytest.approx(best_of_n_kl(n), abs=1e-3)
