"""Shared fixtures live in per-area plugin modules so areas can grow independently."""

pytest_plugins = ["tests.fixtures_world", "tests.fixtures_ray"]
