"""Helpers shared by both stages: config loading, distributed setup, atomic I/O, run environment."""
