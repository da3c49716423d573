"""Deterministic orchestration only: no clock, randomness, network or database here."""
