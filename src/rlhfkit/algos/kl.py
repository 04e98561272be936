"""KL divergence estimators between the policy and the reference, per token.

All take log-probabilities of the *sampled* tokens under the policy (`logp`) and the
reference (`ref_logp`); samples come from the policy, so each is an estimator of
KL(pi || pi_ref) = E_pi[log pi - log pi_ref] (Schulman, "Approximating KL divergence").
"""

from __future__ import annotations

import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref: unbiased, high variance, can be negative per token."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2: biased, low variance, always >= 0."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref / pi: unbiased and always >= 0."""
    log_ratio = ref_logp - logp
    # Clamp before exp: a token the reference finds impossible must not give inf.
    log_ratio = log_ratio.clamp(-20.0, 20.0)
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate with the named estimator (k1, k2 or k3)."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of k1, k2, k3") from None
    return fn(logp, ref_logp)
