"""Synthetic datasets written in the real on-disk formats (for tests and the smoke preset)."""
