"""rlhfkit.algos."""
