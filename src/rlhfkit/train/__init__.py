"""rlhfkit.train."""
