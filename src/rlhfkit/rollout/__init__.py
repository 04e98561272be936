"""rlhfkit.rollout: sampling backends (HF generate, vLLM), batching and log-prob utilities."""

from rlhfkit.rollout.sampler import Sampler, make_sampler

__all__ = ["Sampler", "make_sampler"]
