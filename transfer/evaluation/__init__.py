"""Evaluators that reproduce the reference implementations' numbers."""
