"""Helpers shared by more than one test module or tier (never shipped: see pyproject's packages)."""
