"""Downstream transfer: a flat registry of tasks, each with one or more engines, and the suite runner."""
