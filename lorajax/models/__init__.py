"""Flax model families used by examples and tests."""
