"""rlhfkit.crowd."""
